"""Attention (Book ch. 3): the chapter's values, and each step against an independent one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import attention as A
from gptflax import nn

pytestmark = pytest.mark.lab3

# "Your journey starts with one step": the chapter's 3-d embeddings of the six tokens.
INPUTS = jnp.array(
    [
        [0.43, 0.15, 0.89],
        [0.55, 0.87, 0.66],
        [0.57, 0.85, 0.64],
        [0.22, 0.58, 0.33],
        [0.77, 0.25, 0.10],
        [0.05, 0.80, 0.55],
    ]
)


def test_simplified_attention_book_values_for_query_2():
    context, weights = A.simple_self_attention(INPUTS)
    scores = INPUTS @ INPUTS[1]
    np.testing.assert_allclose(scores, [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865], atol=5e-5)
    np.testing.assert_allclose(
        weights[1], [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581], atol=5e-5
    )
    np.testing.assert_allclose(context[1], [0.4419, 0.6515, 0.5683], atol=5e-5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_v1_and_v2_agree_when_given_the_same_matrices():
    v2 = A.init_qkv(jax.random.key(0), 3, 2)
    v1 = {name: p["kernel"] for name, p in v2.items()}
    np.testing.assert_allclose(A.self_attention_v1(v1, INPUTS), A.self_attention_v2(v2, INPUTS))
    assert A.self_attention_v1(A.init_self_attention_v1(jax.random.key(1), 3, 2), INPUTS).shape == (
        6,
        2,
    )


def test_both_causal_masks_give_the_same_weights():
    scores = jax.random.normal(jax.random.key(0), (6, 6))
    renorm, neg_inf = A.renormalized_causal_weights(scores), A.causal_softmax(scores)
    np.testing.assert_allclose(renorm, neg_inf, rtol=1e-6, atol=1e-7)
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
    params = A.init_qkv(jax.random.key(0), 3, 4)
    x = jax.random.normal(jax.random.key(1), (2, 6, 3))
    changed = x.at[:, 4:].set(7.0)
    out, out_changed = A.causal_attention(params, x), A.causal_attention(params, changed)
    np.testing.assert_allclose(out[:, :4], out_changed[:, :4], rtol=1e-6)
    assert not np.allclose(out[:, 4:], out_changed[:, 4:])


def test_wrapper_of_heads_equals_fused_attention_with_the_same_weights():
    d_in, d_head, n_heads = 3, 2, 3
    heads = [A.init_qkv(k, d_in, d_head) for k in jax.random.split(jax.random.key(0), n_heads)]
    fused = {
        name: {"kernel": jnp.concatenate([h[name]["kernel"] for h in heads], axis=1)}
        for name in ("W_query", "W_key", "W_value")
    }
    d_out = d_head * n_heads
    fused["out_proj"] = {"kernel": jnp.eye(d_out), "bias": jnp.zeros(d_out)}  # the wrapper has none
    x = jax.random.normal(jax.random.key(1), (2, 6, d_in))
    wrapper_out = A.multi_head_attention_wrapper(heads, x)
    np.testing.assert_allclose(wrapper_out, A.multi_head_attention(fused, x, n_heads), rtol=1e-5)
    assert wrapper_out.shape == (2, 6, 6)


def test_dropout_in_attention_needs_a_key_and_is_reproducible():
    params = A.init_multi_head_attention(jax.random.key(0), 8, 8)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    key = jax.random.key(2)
    train = A.multi_head_attention(params, x, 2, drop_rate=0.5, key=key)
    again = A.multi_head_attention(params, x, 2, drop_rate=0.5, key=key)
    np.testing.assert_array_equal(train, again)
    assert not np.allclose(train, A.multi_head_attention(params, x, 2, drop_rate=0.5))
