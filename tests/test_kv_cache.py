"""KV-cache decoding: the same logits and tokens as recomputing everything, few compilations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import checkpoint, models, nn
from gptflax import generate as G
from gptflax.config import GEMMA3_TINY, LLAMA_TINY, QWEN3_TINY, TINY
from gptflax.decoding import DecodingParams, TransposedKernel, decoding_layout, decoding_params
from gptflax.losses import loss_fn
from gptflax.models import llama

pytestmark = pytest.mark.lab5


@pytest.fixture(scope="module")
def params(small_cfg):
    return models.init_params(jax.random.key(0), small_cfg)


@pytest.mark.parametrize("laid_out", [False, True])
@pytest.mark.parametrize(
    "cfg", [TINY.replace(vocab_size=97), LLAMA_TINY, GEMMA3_TINY, QWEN3_TINY,
            QWEN3_TINY.replace(qkv_bias=True, qk_norm=False)],  # the last a Qwen2
)  # fmt: skip
def test_prefill_and_one_token_steps_give_the_forward_logits(cfg, laid_out):
    """For every family, from the model's params and from the decoding layout; Gemma 3's sliding
    layers (window 4) keep only 4 slots, used as a ring."""
    model_params = models.init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
    reference = models.forward(model_params, tokens, cfg)  # (2, 20, V)
    params = decoding_layout(model_params) if laid_out else model_params
    cache = models.init_cache(cfg, 2, 32)
    assert len(cache) == cfg.n_layers  # one cache per layer
    sizes = [layer.keys.shape[2] for layer in cache]
    assert sizes == [min(32, cfg.kv_window(i) or 32) for i in range(cfg.n_layers)]
    positions = jnp.broadcast_to(jnp.arange(20), (2, 20))
    prefill, cache = models.hidden_cached(params, tokens[:, :12], cache, positions[:, :12], cfg)
    np.testing.assert_allclose(models.head(params, prefill), reference[:, :12], atol=2e-5)
    for t in range(12, 20):
        step, cache = models.hidden_cached(
            params, tokens[:, t : t + 1], cache, positions[:, t : t + 1], cfg
        )
        np.testing.assert_allclose(models.head(params, step[:, 0]), reference[:, t], atol=2e-5)


def test_a_ring_cache_takes_chunks_longer_than_its_window_and_no_padding():
    """Gemma 3's sliding layers: a second chunk (a chat's next turn) longer than the window reads
    the old slots beside its own keys; padding (position -1) is written nowhere."""
    cfg = GEMMA3_TINY
    params = models.init_params(jax.random.key(2), cfg)
    tokens = jax.random.randint(jax.random.key(3), (1, 19), 0, cfg.vocab_size)
    reference = models.forward(params, tokens, cfg)
    cache = models.init_cache(cfg, 1, 32)
    chunk = jnp.concatenate([tokens[:, :7], jnp.zeros((1, 3), jnp.int32)], 1)  # 3 of padding
    positions = jnp.where(jnp.arange(10) < 7, jnp.arange(10), -1)[None]
    _, cache = models.hidden_cached(params, chunk, cache, positions, cfg)
    ring, full = cache[0], cache[cfg.sliding_window_pattern - 1]
    assert sorted(ring.positions[0].tolist()) == [3, 4, 5, 6]  # the last window's positions
    assert full.positions[0, :8].tolist() == [*range(7), -1]  # no padding entered
    h, cache = models.hidden_cached(params, tokens[:, 7:19], cache, jnp.arange(7, 19)[None], cfg)
    np.testing.assert_allclose(models.head(params, h), reference[:, 7:19], atol=2e-5)


def test_cached_greedy_equals_the_uncached_loop(params, small_cfg):
    prompt = np.asarray(jax.random.randint(jax.random.key(2), (3, 7), 0, small_cfg.vocab_size))
    cached = G.generate(params, prompt, 20, small_cfg)
    uncached = G.generate(params, prompt, 20, small_cfg, use_cache=False)
    assert cached.shape == (3, 27)
    np.testing.assert_array_equal(cached, uncached)


def test_sampling_with_a_key_draws_the_same_tokens_with_and_without_cache(params, small_cfg):
    prompt = np.array([[5, 6, 7], [8, 9, 10]])
    options = dict(temperature=1.2, top_k=10, key=jax.random.key(3))
    cached = G.generate(params, prompt, 15, small_cfg, **options)
    np.testing.assert_array_equal(
        cached, G.generate(params, prompt, 15, small_cfg, use_cache=False, **options)
    )
    assert len(np.unique(cached[:, 3:])) > 3  # really sampled, not one repeated token


def test_prompts_of_different_lengths_decode_together(params, small_cfg):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14]]
    together = G.generate_cached(params, prompts, 10, small_cfg)
    assert together.shape == (3, 10)
    for prompt, row in zip(prompts, together, strict=True):
        alone = G.generate(params, np.array([prompt]), 10, small_cfg, use_cache=False)
        assert row.tolist() == alone[0, len(prompt) :].tolist()


def test_eos_stops_cached_decoding_early(params, small_cfg):
    prompt = np.array([[1, 2, 3]])
    free = G.generate_cached(params, prompt, 12, small_cfg)[0].tolist()
    eos = free[4]
    stopped = G.generate_cached(params, prompt, 12, small_cfg, eos_id=eos)[0].tolist()
    assert stopped == free[: free.index(eos) + 1]  # up to and including the first eos


def test_one_compilation_per_window_width_and_cache_size(small_cfg, compiles):
    small_cfg = small_cfg.replace(n_layers=3)  # compiled by no other test: every size is new
    params = models.init_params(jax.random.key(0), small_cfg)
    runs = [(3, 20), (5, 10), (8, 1), (9, 12), (15, 2), (16, 16)]  # (prompt length, new tokens)
    for length, new in runs:
        G.generate_cached(params, np.ones((2, length), np.int32), new, small_cfg)
    # (window, cache) sizes, powers of two: (8, 32), (8, 16), (8, 16), (16, 32), (16, 32), (16, 32)
    shapes = {(G.window_width(n, 32), G.window_width(n + new, 32)) for n, new in runs}
    assert len(shapes) == 3
    assert compiles("_decode_with_cache") == len(shapes)  # not one per call


def test_too_long_for_the_cache_is_a_clear_error(params, small_cfg):
    with pytest.raises(ValueError, match="exceeds the context length of 32.*use_cache=False"):
        G.generate_cached(params, np.ones((1, 30), np.int32), 5, small_cfg)
    out = G.generate(params, np.ones((1, 30), np.int32), 5, small_cfg)  # slides instead
    assert out.shape == (1, 35)


@pytest.mark.parametrize("rows", [1, 8, 64, 65, 300])  # both sides of the few-rows form
def test_a_transposed_kernel_multiplies_as_the_kernel_it_stands_for(rows):
    rng = np.random.default_rng(rows)
    x, w_t = rng.standard_normal((rows, 48)), rng.standard_normal((40, 48))  # w_t (d_out, d_in)
    kernel = TransposedKernel(jnp.asarray(w_t, jnp.float32))
    assert kernel.shape == (48, 40)
    got = nn.linear({"kernel": kernel}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, x @ w_t.T, rtol=1e-5, atol=1e-5)  # float64 reference


@pytest.mark.parametrize("rows", [1, 64, 65])
def test_a_bf16_transposed_kernel_needs_no_widened_copy_of_the_weight(rows):
    """At up to 64 rows on a CPU a bf16 weight is read as it is (a fused multiply-and-sum), not
    copied to fp32 first as XLA's dot does; the product is the same to bf16's rounding."""
    rng = np.random.default_rng(rows)
    x, w_t = rng.standard_normal((rows, 256)), rng.standard_normal((512, 256))
    kernel = TransposedKernel(jnp.asarray(w_t, jnp.bfloat16))
    x16 = jnp.asarray(x, jnp.bfloat16)
    got = np.asarray(nn.linear({"kernel": kernel}, x16), np.float64)
    exact = np.asarray(x16, np.float64) @ np.asarray(kernel.w_t, np.float64).T
    assert np.abs(got - exact).max() < 2**-7 * np.abs(exact).max()  # bf16's 8 bits of precision
    compiled = jax.jit(lambda k, x: x @ k).lower(kernel, x16).compile()
    scratch = compiled.memory_analysis().temp_size_in_bytes
    widened = w_t.size * 4  # an fp32 copy of the weight
    if jax.default_backend() == "cpu":
        assert (scratch < widened / 16) == (rows <= 64), scratch


def test_the_decoding_layout_transposes_every_kernel_and_lists_the_blocks(params, small_cfg):
    laid_out = decoding_params(params)
    assert isinstance(laid_out, DecodingParams) and decoding_layout(laid_out) is laid_out
    assert decoding_params(laid_out) is laid_out  # not copied again
    assert len(laid_out.params["trf_blocks"]) == small_cfg.n_layers
    if jax.default_backend() != "cpu":
        pytest.skip("the kernels are transposed on a CPU only")
    fc1 = laid_out.params["trf_blocks"][1]["ff"]["fc1"]
    assert fc1["bias"].shape == (4 * small_cfg.emb_dim,)
    np.testing.assert_array_equal(
        fc1["kernel"].w_t, params["trf_blocks"]["ff"]["fc1"]["kernel"][1].T
    )
    tied = decoding_params(models.init_params(jax.random.key(0), LLAMA_TINY)).params["out_head"]
    assert isinstance(tied["kernel"], TransposedKernel)  # the embedding itself, (V, D)


@pytest.mark.parametrize("cfg", [TINY, LLAMA_TINY, QWEN3_TINY.replace(qkv_bias=True)])
def test_the_decoding_layout_joins_queries_keys_and_values_into_one_projection(cfg):
    """One (D, H * Dh + 2 * G * Dh) matmul, biases joined too (Qwen2's); the same projections."""
    params = models.init_params(jax.random.key(0), cfg)
    block = jax.tree.map(lambda leaf: leaf[0], params["trf_blocks"])["att"]
    att = decoding_layout(params).params["trf_blocks"][0]["att"]
    assert "W_qkv" in att and not {"W_query", "W_key", "W_value"} & set(att)
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    assert att["W_qkv"].sizes == (q_dim, kv_dim, kv_dim)
    assert ("bias" in att["W_qkv"].params) == ("bias" in block["W_query"])
    x = jax.random.normal(jax.random.key(1), (2, 3, cfg.emb_dim))
    for got, name in zip(att["W_qkv"](x), ("W_query", "W_key", "W_value"), strict=True):
        np.testing.assert_allclose(got, nn.linear(block[name], x), atol=1e-5)


@pytest.mark.parametrize("cfg", [LLAMA_TINY, GEMMA3_TINY, QWEN3_TINY])
def test_the_decoding_layout_joins_a_gated_units_gate_and_value(cfg):
    """fc1 and fc2 as one (D, 2 * hidden) matmul: the same feed-forward output; GPT's fc1 and
    fc2, which run one after the other, stay apart."""
    params = models.init_params(jax.random.key(0), cfg)
    ff = jax.tree.map(lambda leaf: leaf[0], params["trf_blocks"])["ff"]
    laid_out = decoding_layout(params).params["trf_blocks"][0]["ff"]
    assert set(laid_out) == {"W_gate_value", "fc3"}
    assert laid_out["W_gate_value"].sizes == (cfg.hidden_dim, cfg.hidden_dim)
    x = jax.random.normal(jax.random.key(1), (2, 3, cfg.emb_dim))
    np.testing.assert_allclose(llama.feed_forward(laid_out, x), llama.feed_forward(ff, x),
                               atol=1e-5)  # fmt: skip
    gpt_ff = decoding_layout(models.init_params(jax.random.key(0), TINY)).params["trf_blocks"][0]
    assert {"fc1", "fc2"} <= set(gpt_ff["ff"])


def test_projections_that_differ_stay_apart_in_the_decoding_layout(small_cfg):
    """A LoRA'd query, or biases on two of the three: the three are not joined."""
    params = models.init_params(jax.random.key(0), small_cfg.replace(qkv_bias=True))
    block = jax.tree.map(lambda leaf: leaf[0], params["trf_blocks"])
    lora = {**block["att"], "W_query": {**block["att"]["W_query"], "lora_a": jnp.ones(2)}}
    one_bias = {**block["att"], "W_key": {"kernel": block["att"]["W_key"]["kernel"]}}
    for att in (lora, one_bias):
        laid_out = decoding_layout({**params, "trf_blocks": [{**block, "att": att}]})
        assert {"W_query", "W_key", "W_value"} <= set(laid_out.params["trf_blocks"][0]["att"])


def test_decoding_params_give_the_same_tokens_and_are_refused_elsewhere(
    params, small_cfg, tmp_path
):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14]]
    laid_out = decoding_params(params)
    assert params["trf_blocks"]["att"]["W_query"]["kernel"].ndim == 3  # still stacked
    np.testing.assert_array_equal(
        G.generate_cached(laid_out, prompts, 10, small_cfg),
        G.generate_cached(params, prompts, 10, small_cfg),
    )
    refused = "decoding layout.*pass the model's own params"
    with pytest.raises(TypeError, match=refused):
        G.generate(laid_out, np.ones((1, 30), np.int32), 5, small_cfg)  # needs the sliding window
    with pytest.raises(TypeError, match=refused):
        loss_fn(laid_out, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32), small_cfg)
    with pytest.raises(TypeError, match=refused):
        checkpoint.save_checkpoint(tmp_path, 1, laid_out, cfg=small_cfg)
