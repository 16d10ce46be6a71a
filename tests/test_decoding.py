"""Decoding strategies (Book §5.3): temperature, top-k, sampling with keys, eos for batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import generate as G
from gptflax import models

pytestmark = pytest.mark.lab5

TOY_LOGITS = jnp.array([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])


def test_book_toy_values():
    assert int(jnp.argmax(TOY_LOGITS)) == 3  # "forward"
    top3 = G.top_k_logits(TOY_LOGITS, 3)
    assert np.isfinite(np.asarray(top3)).nonzero()[0].tolist() == [0, 3, 7]
    probas = jax.nn.softmax(top3)
    np.testing.assert_allclose(probas[jnp.array([3, 7, 0])], [0.5775, 0.3610, 0.0615], atol=5e-5)


def test_sampling_follows_the_filtered_softmax_and_the_key():
    logits = jnp.tile(TOY_LOGITS, (4000, 1))
    draws = G.sample_next_token(logits, jax.random.key(0), temperature=1.0, top_k=3)
    freqs = np.bincount(np.asarray(draws), minlength=9) / 4000
    np.testing.assert_allclose(freqs, jax.nn.softmax(G.top_k_logits(TOY_LOGITS, 3)), atol=0.03)
    assert set(np.unique(np.asarray(draws)).tolist()) <= {0, 3, 7}
    again = G.sample_next_token(logits, jax.random.key(0), temperature=1.0, top_k=3)
    np.testing.assert_array_equal(draws, again)
    with pytest.raises(ValueError, match="PRNG key"):
        G.sample_next_token(logits, None, temperature=1.0)


@pytest.fixture(scope="module")
def params(small_cfg):
    return models.init_params(jax.random.key(0), small_cfg)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_is_reproducible_for_a_key(params, small_cfg, use_cache):
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    options = dict(temperature=1.5, top_k=20, use_cache=use_cache)
    run = lambda k: G.generate(params, prompt, 10, small_cfg, key=k, **options)  # noqa: E731
    np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
    assert not np.array_equal(run(jax.random.key(1)), run(jax.random.key(2)))


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_finishes_each_row_of_a_batch_on_its_own(params, small_cfg, use_cache):
    prompt = np.array([[1, 2, 3], [40, 50, 60]])
    free = G.generate(params, prompt, 12, small_cfg, use_cache=use_cache)
    row0, row1 = free[0, 3:].tolist(), free[1, 3:].tolist()
    # a token row 0 emits (at step >= 2) before row 1 does, and row 1 before step 11
    eos = next(t for t in row0[2:] if row0.index(t) < row1.index(t) if t in row1[:11])
    out = G.generate(params, prompt, 12, small_cfg, eos_id=eos, use_cache=use_cache)
    for row_free, row in zip(free, out, strict=True):
        gen, gen_free = row[3:].tolist(), row_free[3:].tolist()
        cut = gen.index(eos) if eos in gen else len(gen)
        assert gen[:cut] == gen_free[:cut]  # the same tokens up to its own eos
        assert all(t == eos for t in gen[cut:])  # then only eos
        assert G.trim_at_eos(row[3:], eos) == gen_free[:cut]
    assert out.shape[1] == 3 + row1.index(eos) + 1  # stops once the last row has finished
