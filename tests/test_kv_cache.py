"""KV-cache decoding: the same logits and tokens as recomputing everything, few compilations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import generate as G
from gptflax import gpt, nn

pytestmark = pytest.mark.lab5


@pytest.fixture(scope="module")
def params(small_cfg):
    return gpt.init_params(jax.random.key(0), small_cfg)


def test_prefill_and_one_token_steps_give_the_forward_logits(params, small_cfg):
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, small_cfg.vocab_size)
    reference = gpt.forward(params, tokens, small_cfg)  # (2, 20, V)
    cache = gpt.init_cache(small_cfg, 2, small_cfg.context_length)
    start = jnp.zeros(2, jnp.int32)
    assert len(cache) == small_cfg.n_layers  # one (keys, values) pair per layer
    prefill, cache = gpt.hidden_cached(params, tokens[:, :12], cache, start, small_cfg)
    np.testing.assert_allclose(gpt.head(params, prefill), reference[:, :12], atol=1e-5)
    for t in range(12, 20):
        step, cache = gpt.hidden_cached(params, tokens[:, t : t + 1], cache, start + t, small_cfg)
        np.testing.assert_allclose(gpt.head(params, step[:, 0]), reference[:, t], atol=1e-5)


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
    params = gpt.init_params(jax.random.key(0), small_cfg)
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
def test_times_transposed_is_the_matmul_with_the_transposed_weight(rows):
    rng = np.random.default_rng(rows)
    x, w_t = rng.standard_normal((rows, 48)), rng.standard_normal((40, 48))  # w_t (d_out, d_in)
    got = nn.times_transposed(jnp.asarray(x, jnp.float32), jnp.asarray(w_t, jnp.float32))
    np.testing.assert_allclose(got, x @ w_t.T, rtol=1e-5, atol=1e-5)  # float64 reference


def test_the_decoding_layout_transposes_every_kernel_and_lists_the_blocks(params, small_cfg):
    laid_out = G.decoding_params(params)
    assert len(laid_out["trf_blocks"]) == small_cfg.n_layers
    assert nn.decoding_layout(laid_out) is laid_out  # already laid out: left as it is
    if jax.default_backend() != "cpu":
        pytest.skip("the kernels are transposed on a CPU only")
    fc1 = laid_out["trf_blocks"][1]["ff"]["fc1"]
    assert "kernel" not in fc1 and fc1["bias"].shape == (4 * small_cfg.emb_dim,)
    np.testing.assert_array_equal(fc1["kernel_t"], params["trf_blocks"]["ff"]["fc1"]["kernel"][1].T)
    np.testing.assert_array_equal(laid_out["out_head"]["kernel_t"], params["out_head"]["kernel"].T)


def test_decoding_params_give_the_same_tokens_and_leave_the_params_as_they_were(params, small_cfg):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14]]
    laid_out = G.decoding_params(params)
    assert params["trf_blocks"]["att"]["W_query"]["kernel"].ndim == 3  # still stacked
    np.testing.assert_array_equal(
        G.generate_cached(laid_out, prompts, 10, small_cfg),
        G.generate_cached(params, prompts, 10, small_cfg),
    )
    with pytest.raises(ValueError, match="KV cache only.*pass the model's own params"):
        G.generate(laid_out, np.ones((1, 30), np.int32), 5, small_cfg)  # needs the sliding window
