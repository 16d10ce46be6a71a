"""The Gemma 3 family: each change from Llama checked against an independent formula, the sliding
windows and their KV rings, the 270M's size; its real weights continue a prompt as llama.cpp does
(transformers reading the same file: tests/test_hf_gemma3_parity.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import models, nn, sources
from gptflax.config import GEMMA3_270M, GEMMA3_TINY
from gptflax.generate import generate
from gptflax.models import gemma3

pytestmark = pytest.mark.labgemma3
CFG = GEMMA3_TINY


def bumped(cfg, seed=0):
    """Random params with the norms away from their start (scale 0: a plain RMSNorm)."""
    params = models.init_params(jax.random.key(seed), cfg)
    noise = jax.random.normal(jax.random.key(seed + 1), (cfg.emb_dim,))
    blocks = params["trf_blocks"]
    for name in ("norm1", "post_att_norm", "norm2", "post_ff_norm"):
        blocks[name]["scale"] = blocks[name]["scale"] + 0.3 * noise
    return params


def test_gemmas_rms_norm_multiplies_by_one_plus_its_scale():
    x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    scale = np.linspace(-0.5, 1.0, 8, dtype=np.float32)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * (1 + scale)
    np.testing.assert_allclose(gemma3.rms_norm({"scale": scale}, x, 1e-6), expected, rtol=1e-5)


def test_embeddings_are_scaled_by_the_root_of_the_width():
    params = models.init_params(jax.random.key(0), CFG)
    x = gemma3.embed(params, jnp.array([[3, 4]]), CFG, positions=None)
    expected = params["tok_emb"]["embedding"][jnp.array([[3, 4]])] * np.sqrt(CFG.emb_dim)
    np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_sliding_layers_see_only_their_window_and_global_ones_everything():
    """Two sliding layers of window 4 see 2 * 3 positions back; a global layer sees all."""
    local = CFG.replace(n_layers=2, sliding_window_pattern=3)  # layers 0, 1 slide
    tokens = jnp.arange(12)[None] % CFG.vocab_size
    for cfg, reaches in ((local, False), (CFG, True)):  # CFG: layer 5 is global
        params = bumped(cfg)
        changed = tokens.at[0, 3].set(99)  # 8 positions before the last
        last = [models.forward(params, t, cfg)[0, -1] for t in (tokens, changed)]
        assert bool(jnp.any(last[0] != last[1])) == reaches
    params = bumped(local)
    near = tokens.at[0, 6].set(99)  # 5 positions back: within reach
    assert jnp.any(
        models.forward(params, near, local)[0, -1] != models.forward(params, tokens, local)[0, -1]
    )


def test_a_window_as_long_as_the_text_is_full_attention():
    wide = CFG.replace(sliding_window=64, rope_local_base=CFG.rope_base)
    tokens = jax.random.randint(jax.random.key(2), (2, 20), 0, CFG.vocab_size)
    params = bumped(CFG)
    np.testing.assert_allclose(
        models.forward(params, tokens, wide),
        models.forward(params, tokens, wide.replace(sliding_window_pattern=1)),  # all global
        rtol=1e-5,
        atol=1e-5,
    )


def test_gemma3_270m_layers_caches_and_size():
    cfg = GEMMA3_270M
    assert [i for i in range(cfg.n_layers) if cfg.kv_window(i) is None] == [5, 11, 17]
    cache = jax.eval_shape(lambda: models.init_cache(cfg, 1, 32_768))  # no memory allocated
    assert [c.keys.shape[2] for c in cache] == [
        32_768 if i in (5, 11, 17) else 512 for i in range(18)
    ]
    shapes = jax.eval_shape(lambda: models.init_params(jax.random.key(0), cfg))
    assert nn.count_params(shapes) == 268_098_176  # 168 M of them the embedding
    assert shapes["trf_blocks"]["att"]["W_query"]["kernel"].shape == (18, 640, 1024)  # 4 x 256


@pytest.mark.slow
def test_the_real_model_continues_as_llama_cpp_does():
    model = sources.load_model("gemma3-270m")
    assert model.cfg == GEMMA3_270M and model.tokenizer.n_vocab == 262_144
    ids = model.tokenizer.encode("The capital of France is", bos=True)
    assert ids == [2, 818, 5279, 529, 7001, 563]  # <bos> first
    out = generate(model.params, [ids], 16, model.cfg)[0, len(ids) :]
    expected = " the capital of the country of France. It is the largest city in France and"
    assert model.tokenizer.decode(out) == expected  # llama.cpp's greedy continuation
