"""Attention, step by step as chapter 3 builds it, up to the causal multi-head attention of GPT.

Every function is pure: weights come in as dicts of arrays (see `gptflax.nn`), dropout takes an
explicit PRNG key, and `key=None` means no dropout (evaluation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptflax import nn


def simple_self_attention(inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention without trainable weights: (T, D) -> context (T, D), weights (T, T) (Book §3.3)."""
    attn_scores = inputs @ inputs.T  # (T, T): dot product of every pair of inputs
    attn_weights = jax.nn.softmax(attn_scores, axis=-1)
    return attn_weights @ inputs, attn_weights


def init_self_attention_v1(key: jax.Array, d_in: int, d_out: int) -> dict:
    """Raw (d_in, d_out) query, key and value matrices drawn from U(0, 1), as the book's v1."""
    k_q, k_k, k_v = jax.random.split(key, 3)
    return {
        name: jax.random.uniform(k, (d_in, d_out))
        for name, k in zip(("W_query", "W_key", "W_value"), (k_q, k_k, k_v), strict=True)
    }


def self_attention_v1(params: dict, x: jax.Array) -> jax.Array:
    """Scaled dot-product attention, raw weight matrices: (T, d_in) -> (T, d_out) (Book §3.4)."""
    queries, keys, values = (x @ params[w] for w in ("W_query", "W_key", "W_value"))  # (T, d_out)
    attn_scores = queries @ keys.T  # (T, T)
    attn_weights = jax.nn.softmax(attn_scores / keys.shape[-1] ** 0.5, axis=-1)
    return attn_weights @ values


def init_qkv(key: jax.Array, d_in: int, d_out: int, qkv_bias: bool = False) -> dict:
    """Query, key and value linear layers (Book §3.4.2's v2, and every attention after it)."""
    keys = jax.random.split(key, 3)
    names = ("W_query", "W_key", "W_value")
    return {
        n: nn.init_linear(k, d_in, d_out, bias=qkv_bias) for n, k in zip(names, keys, strict=True)
    }


def qkv(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Project x (..., d_in) to queries, keys and values (..., d_out) each."""
    return tuple(nn.linear(params[n], x) for n in ("W_query", "W_key", "W_value"))


def self_attention_v2(params: dict, x: jax.Array) -> jax.Array:
    """Self-attention with linear layers: (T, d_in) -> (T, d_out) (Book §3.4.2)."""
    queries, keys, values = qkv(params, x)
    attn_weights = jax.nn.softmax(queries @ keys.T / keys.shape[-1] ** 0.5, axis=-1)
    return attn_weights @ values


def causal_mask(num_tokens: int) -> jax.Array:
    """(T, T) booleans, True where a query may attend: on and below the diagonal (Book §3.5)."""
    return jnp.tril(jnp.ones((num_tokens, num_tokens), dtype=bool))


def renormalized_causal_weights(attn_scores: jax.Array) -> jax.Array:
    """The book's first way: softmax, zero the future, divide each row by its sum (Book §3.5.1)."""
    attn_weights = jax.nn.softmax(attn_scores, axis=-1)
    masked = jnp.where(causal_mask(attn_scores.shape[-1]), attn_weights, 0.0)
    return masked / masked.sum(axis=-1, keepdims=True)


def causal_softmax(attn_scores: jax.Array) -> jax.Array:
    """The efficient way: -inf above the diagonal, then softmax (..., T, T) (Book §3.5.1)."""
    masked = jnp.where(causal_mask(attn_scores.shape[-1]), attn_scores, -jnp.inf)
    return jax.nn.softmax(masked, axis=-1)


def causal_attention(
    params: dict, x: jax.Array, *, drop_rate: float = 0.0, key: jax.Array | None = None
) -> jax.Array:
    """One causal head with dropout on the weights: (B, T, d_in) -> (B, T, d_out) (Book §3.5.3)."""
    queries, keys, values = qkv(params, x)  # (B, T, d_out) each
    attn_scores = queries @ keys.swapaxes(-1, -2)  # (B, T, T)
    attn_weights = causal_softmax(attn_scores / keys.shape[-1] ** 0.5)
    attn_weights = nn.dropout(attn_weights, drop_rate, key)
    return attn_weights @ values


def multi_head_attention_wrapper(
    heads: list[dict], x: jax.Array, *, drop_rate: float = 0.0, key: jax.Array | None = None
) -> jax.Array:
    """Run independent causal heads and concatenate them: (B, T, n_heads * d_out) (Book §3.6.1)."""
    keys = jax.random.split(key, len(heads)) if key is not None else [None] * len(heads)
    outputs = [
        causal_attention(p, x, drop_rate=drop_rate, key=k) for p, k in zip(heads, keys, strict=True)
    ]
    return jnp.concatenate(outputs, axis=-1)


def init_multi_head_attention(
    key: jax.Array, d_in: int, d_out: int, qkv_bias: bool = False
) -> dict:
    """Fused query/key/value projections for all heads, and the output projection (Book §3.6.2)."""
    k_qkv, k_out = jax.random.split(key)
    return {
        **init_qkv(k_qkv, d_in, d_out, qkv_bias),
        "out_proj": nn.init_linear(k_out, d_out, d_out),
    }


def split_heads(x: jax.Array, n_heads: int) -> jax.Array:
    """(B, T, D) -> (B, H, T, D / H)."""
    b, t, d = x.shape
    return x.reshape(b, t, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, H, T, Dh) -> (B, T, H * Dh)."""
    b, h, t, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * dh)


def multi_head_attention(
    params: dict,
    x: jax.Array,
    n_heads: int,
    *,
    drop_rate: float = 0.0,
    key: jax.Array | None = None,
    fused: bool = False,
) -> jax.Array:
    """Causal multi-head attention with one matmul per projection: (B, T, D) -> (B, T, D).

    Book §3.6.2: project once, split the projections into heads, attend per head, merge, project.
    The softmax runs in float32 whatever the compute dtype. `fused` hands the attention itself to
    `jax.nn.dot_product_attention` (cuDNN flash attention on a GPU; no attention dropout).
    """
    if fused:
        b, t, d = x.shape
        heads = (y.reshape(b, t, n_heads, d // n_heads) for y in qkv(params, x))  # (B, T, H, Dh)
        context = jax.nn.dot_product_attention(*heads, is_causal=True).reshape(b, t, d)
        return nn.linear(params["out_proj"], context)
    queries, keys, values = (split_heads(y, n_heads) for y in qkv(params, x))  # (B, H, T, Dh)
    attn_scores = queries @ keys.swapaxes(-1, -2)  # (B, H, T, T)
    attn_weights = causal_softmax(attn_scores.astype(jnp.float32) / keys.shape[-1] ** 0.5)
    attn_weights = nn.dropout(attn_weights.astype(x.dtype), drop_rate, key)
    context = merge_heads(attn_weights @ values)  # (B, T, D)
    return nn.linear(params["out_proj"], context)


def multi_head_attention_cached(
    params: dict, x: jax.Array, n_heads: int, cache: tuple, positions: jax.Array
) -> tuple[jax.Array, tuple]:
    """`multi_head_attention` for new tokens only, reading earlier keys and values from a cache.

    x (B, S, D) holds the tokens at `positions` (B, S); cache is (keys, values), each
    (B, T_max, H, Dh), one slot per position. The new keys and values are written into their
    slots, and each query attends to every slot at or before its own position: the same causal
    attention, without recomputing the past. Returns (B, S, D) and the updated cache.
    """
    queries, keys, values = (split_heads(y, n_heads) for y in qkv(params, x))  # (B, H, S, Dh)
    rows = jnp.arange(x.shape[0])[:, None]  # (B, 1)
    cache_k, cache_v = (
        c.at[rows, positions].set(y.transpose(0, 2, 1, 3))  # (B, S, H, Dh) into (B, T_max, H, Dh)
        for c, y in zip(cache, (keys, values), strict=True)
    )
    attn_scores = jnp.einsum("bhsd,bthd->bhst", queries, cache_k)  # (B, H, S, T_max)
    slots = jnp.arange(cache_k.shape[1])  # (T_max,)
    visible = slots[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, S, T_max)
    scaled = attn_scores.astype(jnp.float32) / keys.shape[-1] ** 0.5
    attn_weights = jax.nn.softmax(jnp.where(visible, scaled, -jnp.inf), axis=-1).astype(x.dtype)
    context = jnp.einsum("bhst,bthd->bhsd", attn_weights, cache_v)  # (B, H, S, Dh)
    return nn.linear(params["out_proj"], merge_heads(context)), (cache_k, cache_v)
