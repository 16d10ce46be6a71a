"""Greedy generation (Book §4.7): the book's loop, without recompiling for every length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import generate as G
from gptflax import models
from gptflax.generate import window_width

pytestmark = pytest.mark.lab4


def naive_greedy(params, idx, max_new_tokens, context_size, cfg):
    """The book's loop as written: the whole growing sequence through the model every step."""
    for _ in range(max_new_tokens):
        logits = jax.jit(models.forward)(params, idx[:, -context_size:], cfg)[:, -1, :]
        idx = jnp.concatenate([idx, jnp.argmax(logits, -1, keepdims=True)], axis=1)
    return idx


def test_window_widths_are_few():
    widths = {window_width(n, 1024) for n in range(1, 1025)}
    assert widths == {8, 16, 32, 64, 128, 256, 512, 1024}
    assert window_width(20, 24) == 24 and window_width(3, 1024) == 8


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("context_size", [32, 12])
def test_greedy_tokens_equal_the_naive_loop(small_cfg, context_size, use_cache):
    cfg = small_cfg.replace(context_length=context_size)  # 12: the window slides
    params = models.init_params(jax.random.key(0), cfg)
    idx = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
    ours = G.generate(params, idx, 12, cfg, use_cache=use_cache)
    assert ours.shape == (2, 17)
    np.testing.assert_array_equal(ours, naive_greedy(params, idx, 12, context_size, cfg))


def test_generation_compiles_once_per_window_width(small_cfg, compiles):
    cfg = small_cfg.replace(n_layers=1)  # compiled by no other test: every width is new
    params = models.init_params(jax.random.key(0), cfg)
    options = dict(temperature=1.0, key=jax.random.key(0), use_cache=False)
    G.generate(params, np.zeros((3, 1), np.int32), 40, cfg, **options)  # slides past 32
    assert compiles("_next_token") == 3  # widths 8, 16 and 32, not one per token
