"""The Llama family: each change from GPT checked against an independent formula, the cache against
the full forward pass, and the presets' parameter counts against the published ones."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import attention, checkpoint, models, nn, rope
from gptflax.config import LLAMA_PRESETS, LLAMA_TINY, Llama3RoPE, LlamaConfig
from gptflax.generate import generate, generate_cached
from gptflax.models import llama

pytestmark = pytest.mark.labllama
CFG = LLAMA_TINY
PARAMS = models.init_params(jax.random.key(0), CFG)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))


def test_rms_norm_divides_by_the_root_mean_square():
    x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    scale = np.linspace(0.5, 2.0, 8, dtype=np.float32)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(llama.rms_norm({"scale": scale}, x, 1e-5), expected, rtol=1e-5)


def test_swiglu_gates_one_projection_by_the_silu_of_another():
    p = llama.init_feed_forward(jax.random.key(1), 8, 16)
    x = np.random.default_rng(2).normal(size=(2, 3, 8)).astype(np.float32)
    a, b = x @ np.asarray(p["fc1"]["kernel"]), x @ np.asarray(p["fc2"]["kernel"])
    expected = (a / (1 + np.exp(-a)) * b) @ np.asarray(p["fc3"]["kernel"])
    np.testing.assert_allclose(llama.feed_forward(p, x), expected, rtol=1e-4, atol=1e-5)


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    rng = np.random.default_rng(3)
    q, k = (rng.normal(size=(1, 1, 1, CFG.head_dim)).astype(np.float32) for _ in range(2))

    inv_freq = rope.rope_frequencies(CFG.head_dim, CFG.rope_base)

    def score(m, n):
        cos_m, sin_m = rope.rope_angles(jnp.array([[m]]), inv_freq)
        cos_n, sin_n = rope.rope_angles(jnp.array([[n]]), inv_freq)
        return float(jnp.sum(rope.apply_rope(q, cos_m, sin_m) * rope.apply_rope(k, cos_n, sin_n)))

    assert score(7, 3) == pytest.approx(score(107, 103), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-2)
    assert score(5, 5) == pytest.approx(float(np.sum(q * k)), rel=1e-5)  # distance 0: no rotation


def test_a_train_step_computes_the_rotary_angles_once_not_in_every_op_that_reads_them():
    cfg = CFG.replace(n_layers=3)
    params = models.init_params(jax.random.key(0), cfg)
    tokens = jnp.zeros((2, cfg.context_length), jnp.int32)

    def loss(p):
        return jnp.mean(models.forward(p, tokens, cfg) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert hlo.count(" cosine(") == hlo.count(" sine(") == 1  # for 3 layers' queries and keys


def test_llama3_rescaling_follows_metas_rule():
    cfg = LLAMA_PRESETS["Llama-3.2-1B"]
    s = cfg.rope_scaling
    got = np.asarray(rope.rope_frequencies(cfg.head_dim, cfg.rope_base, s))
    for i, freq in enumerate(cfg.rope_base ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < s.original_context_length / s.high_freq_factor:
            expected = freq
        elif wavelen > s.original_context_length / s.low_freq_factor:
            expected = freq / s.factor
        else:
            smooth = (s.original_context_length / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            expected = (1 - smooth) * freq / s.factor + smooth * freq
        assert got[i] == pytest.approx(expected, rel=1e-5)


def test_grouped_query_attention_equals_multi_head_with_repeated_key_value_heads():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(2, 4, 5, 8)).astype(np.float32)  # 4 query heads, (B, H, T, Dh)
    k, v = (rng.normal(size=(2, 2, 5, 8)).astype(np.float32) for _ in range(2))  # 2 kv heads
    visible = np.tril(np.ones((5, 5), bool))[None]
    positions = jnp.arange(5)[None]
    k4, v4 = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)  # head h reads kv head h // 2
    scores = np.einsum("bhsd,bhtd->bhst", q, k4) / math.sqrt(8)
    scores = np.where(visible[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhst,bhtd->bshd", weights, v4).reshape(2, 5, 32)
    got = attention.attend(q, k, v, positions, positions)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cached_forward_equals_the_full_forward():
    full = models.forward(PARAMS, TOKENS, CFG)
    cache = models.init_cache(CFG, 2, 16)
    assert len(cache) == CFG.n_layers  # one cache per layer, of the key/value heads only
    assert cache[0].keys.shape == (2, CFG.n_kv_heads, 16, CFG.head_dim)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    prefill, cache = models.hidden_cached(PARAMS, TOKENS[:, :8], cache, positions[:, :8], CFG)
    steps = [prefill]
    for t in range(8, 12):
        step, cache = models.hidden_cached(
            PARAMS, TOKENS[:, t : t + 1], cache, positions[:, t : t + 1], CFG
        )
        steps.append(step)
    logits = models.head(PARAMS, jnp.concatenate(steps, 1))
    np.testing.assert_allclose(logits, full, rtol=1e-4, atol=1e-5)


def test_the_one_decoder_runs_llama_cached_uncached_and_ragged():
    key = jax.random.key(5)
    for options in ({}, {"temperature": 1.0, "top_k": 10, "key": key}):
        cached = generate(PARAMS, TOKENS[:, :4], 8, CFG, **options)
        uncached = generate(PARAMS, TOKENS[:, :4], 8, CFG, use_cache=False, **options)
        np.testing.assert_array_equal(cached, uncached)
    ragged = generate_cached(PARAMS, [TOKENS[0, :4], TOKENS[1, :2]], 5, CFG)
    alone = generate(PARAMS, TOKENS[1:, :2], 5, CFG, use_cache=False)[0, 2:]
    np.testing.assert_array_equal(ragged[1], alone)


def test_tied_head_is_the_token_embedding_and_untied_has_its_own():
    assert "out_head" not in PARAMS
    h = jax.random.normal(jax.random.key(6), (1, 2, CFG.emb_dim))
    np.testing.assert_allclose(
        models.head(PARAMS, h), h @ PARAMS["tok_emb"]["embedding"].T, rtol=1e-5, atol=1e-6
    )
    untied = models.init_params(jax.random.key(0), CFG.replace(tie_embeddings=False))
    assert untied["out_head"]["kernel"].shape == (CFG.emb_dim, CFG.vocab_size)


def test_bf16_params_run_in_bf16_close_to_float32():
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), PARAMS)
    logits = models.forward(half, TOKENS, CFG)
    assert logits.dtype == jnp.bfloat16
    full = models.forward(PARAMS, TOKENS, CFG)
    assert float(jnp.abs(logits.astype(jnp.float32) - full).max()) < 0.05 * float(
        jnp.abs(full).max()
    )


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("SmolLM2-135M", 134_515_008),  # the number, and the GGUF's tensors
        ("SmolLM2-360M", 361_821_120),
        ("SmolLM2-1.7B", 1_711_376_384),
        ("Llama-3.2-1B", 1_235_814_400),  # Meta's model card: 1.23B
        ("Llama-3.2-3B", 3_212_749_824),  # 3.21B
    ],
)
def test_presets_have_the_published_parameter_counts(name, published):
    shapes = jax.eval_shape(lambda: models.init_params(jax.random.key(0), LLAMA_PRESETS[name]))
    assert nn.count_params(shapes) == published


def test_config_checks_and_identity():
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        LlamaConfig(n_heads=9, n_kv_heads=2)
    with pytest.raises(ValueError, match="head_dim=3 must be even"):
        LlamaConfig(emb_dim=27, n_heads=9, n_kv_heads=3)
    assert LLAMA_PRESETS["Llama-3.2-3B"].head_dim == 128  # follows emb_dim / n_heads on replace
    assert LlamaConfig(head_dim=128).replace(emb_dim=1152).head_dim == 128  # a set one stays
    assert CFG.same_weights_as(CFG.replace(context_length=8))  # no weight depends on it
    assert not CFG.same_weights_as(CFG.replace(n_kv_heads=4))
    scaled = CFG.replace(rope_scaling={"factor": 8.0})  # as a checkpoint's JSON gives it back
    assert scaled.rope_scaling == Llama3RoPE(factor=8.0)


def test_a_llama_checkpoint_loads_back_with_its_config(tmp_path):
    cfg = CFG.replace(rope_scaling=Llama3RoPE(factor=8.0, original_context_length=16))
    params = models.init_params(jax.random.key(7), cfg)
    checkpoint.save_checkpoint(tmp_path / "ckpt", 1, params, cfg=cfg)
    loaded_cfg, loaded = checkpoint.load_model(tmp_path / "ckpt")
    assert loaded_cfg == cfg  # the nested rope scaling survives the JSON
    np.testing.assert_array_equal(
        models.forward(loaded, TOKENS, cfg), models.forward(params, TOKENS, cfg)
    )
