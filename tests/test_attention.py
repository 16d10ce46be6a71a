"""Attention (Book ch. 3): the library's final form against independent computations (lab 3
checks the chapter's values and its intermediate forms)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import attention as A
from gptflax import nn

pytestmark = pytest.mark.lab3


def test_causal_softmax_is_the_softmax_over_the_past():
    scores = jax.random.normal(jax.random.key(0), (6, 6))
    neg_inf = A.causal_softmax(scores)
    masked = jnp.where(jnp.tril(jnp.ones((6, 6))) > 0, jnp.exp(scores), 0.0)  # independent form
    np.testing.assert_allclose(neg_inf, masked / masked.sum(-1, keepdims=True), rtol=1e-6)
    assert jnp.all(jnp.triu(neg_inf, k=1) == 0)
    np.testing.assert_allclose(neg_inf.sum(-1), 1.0, rtol=1e-6)
    assert neg_inf[0, 0] == 1.0  # the first token can only attend to itself


def test_dropout_zeroes_about_rate_and_keeps_the_mean():
    x = jnp.ones((200, 200))
    y = nn.dropout(x, 0.5, jax.random.key(0))
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 2.0}
    assert abs(float((y == 0).mean()) - 0.5) < 0.01 and abs(float(y.mean()) - 1.0) < 0.02
    assert nn.dropout(x, 0.5, None) is x  # no key: evaluation, identity


def test_dropout_at_the_gpt_rate_on_an_odd_size_keeps_the_mean_exactly():
    x = jnp.ones((3, 1001, 37))  # odd size: the last random word decides one element
    y = nn.dropout(x, 0.1, jax.random.key(1))
    dropped = y == 0
    assert abs(float(dropped.mean()) - 0.1) < 0.003
    kept_value = 2**16 / (2**16 - round(0.1 * 2**16))  # 1 / (1 - 0.1000061)
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, kept_value], rtol=1e-7)
    # the two 16-bit halves of a word decide far-apart elements independently
    flat, half = np.asarray(dropped).ravel(), x.size // 2
    first, second = flat[:half], flat[-half:]
    assert abs(float(np.corrcoef(first, second)[0, 1])) < 0.01
    with pytest.raises(ValueError, match="dropout rate"):
        nn.dropout(x, 1.0, jax.random.key(1))


def test_causal_attention_ignores_the_future():
    params = A.init_multi_head_attention(jax.random.key(0), 4, 4)
    x = jax.random.normal(jax.random.key(1), (2, 6, 4))
    changed = x.at[:, 4:].set(7.0)
    out, out_changed = (A.multi_head_attention(params, y, 2) for y in (x, changed))
    np.testing.assert_allclose(out[:, :4], out_changed[:, :4], rtol=1e-6)
    assert not np.allclose(out[:, 4:], out_changed[:, 4:])


def test_dropout_in_attention_needs_a_key_and_is_reproducible():
    params = A.init_multi_head_attention(jax.random.key(0), 8, 8)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    key = jax.random.key(2)
    train = A.multi_head_attention(params, x, 2, drop_rate=0.5, key=key)
    again = A.multi_head_attention(params, x, 2, drop_rate=0.5, key=key)
    np.testing.assert_array_equal(train, again)
    assert not np.allclose(train, A.multi_head_attention(params, x, 2, drop_rate=0.5))


@pytest.mark.parametrize("heads,window", [((4, 4), None), ((4, 2), None), ((4, 2), 100)])
def test_attention_in_query_blocks_equals_the_whole_sequence_at_once(heads, window):
    h, g = heads
    s = 2 * A.QUERY_BLOCK + 40  # three blocks, the last a short one
    q, k, v = (jax.random.normal(jax.random.key(i), (2, n, s, 8)) for i, n in enumerate((h, g, g)))
    positions = jnp.concatenate([jnp.full((2, 3), -1), jnp.arange(s - 3)[None].repeat(2, 0)], 1)
    keep = jax.random.bernoulli(jax.random.key(5), 0.7, (2, s, s))  # a sparse choice of keys
    for subset in (None, keep):
        blocked = A.attend(q, k, v, positions, positions, window=window, keep=subset, causal=True)
        whole = A.attend(q, k, v, positions, positions, window=window, keep=subset)
        sees = A.visible_keys(positions, positions, window)  # (B, S, S)
        sees = (sees if subset is None else sees & subset).any(-1)  # else its output is padding
        np.testing.assert_allclose(blocked[sees], whole[sees], rtol=1e-5, atol=1e-6)
        assert sees.sum() > 2 * (s - 3) * 0.6

    # blocked, the scores above the diagonal's blocks are never computed: fewer FLOPs
    def flops(causal):
        attend = jax.jit(lambda q: A.attend(q, k, v, positions, positions, causal=causal))
        return attend.lower(q).compile().cost_analysis()["flops"]

    assert flops(True) < 0.8 * flops(False)


@pytest.mark.parametrize("heads,window,scale", [((4, 4), None, None), ((6, 2), 100, 0.3)])
def test_attention_gradients_written_out_equal_differentiating_the_formula(heads, window, scale):
    """`softmax_attention`'s backward pass, written out, against JAX differentiating a plain
    softmax(Q K^T) V with each key/value head repeated for its query heads."""
    h, g = heads
    s, dh = A.QUERY_BLOCK + 40, 8  # two query blocks
    q, k, v, w = (
        jax.random.normal(jax.random.key(i), (2, n, s, dh)) for i, n in enumerate((h, g, g, h))
    )
    positions = jnp.concatenate([jnp.full((2, 3), -1), jnp.arange(s - 3)[None].repeat(2, 0)], 1)
    keep = jax.random.bernoulli(jax.random.key(5), 0.7, (2, s, s))
    sees = A.visible_keys(positions, positions, window) & keep  # (B, S, T); padding sees none
    w = w * sees.any(-1)[:, None, :, None]  # a query that sees nothing: output unused

    def library(q, k, v):
        out = A.attend(q, k, v, positions, positions, window=window, scale=scale, keep=keep,
                       causal=True)  # fmt: skip
        return jnp.sum(out * A.merge_heads(w))

    def formula(q, k, v):
        k, v = (jnp.repeat(y, h // g, axis=1) for y in (k, v))  # (B, H, T, Dh)
        scores = q @ k.swapaxes(-1, -2) * (dh**-0.5 if scale is None else scale)
        scores = jnp.where(sees[:, None], scores, -1e30)
        return jnp.sum(jax.nn.softmax(scores, axis=-1) @ v * w)

    got, want = (jax.grad(f, argnums=(0, 1, 2))(q, k, v) for f in (library, formula))
    for name, a, b in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=f"d{name}")
    assert float(jnp.abs(got[0][:, :, :3]).max()) == 0.0  # padding queries pass no gradient
