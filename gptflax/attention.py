"""Causal multi-head attention, the final form of chapter 3 (lab 3 derives the steps to it).

Every function is pure: weights come in as dicts of arrays (see `gptflax.nn`), dropout takes an
explicit PRNG key, and `key=None` means no dropout (evaluation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptflax import nn


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


def causal_mask(num_tokens: int) -> jax.Array:
    """(T, T) booleans, True where a query may attend: on and below the diagonal (Book §3.5)."""
    return jnp.tril(jnp.ones((num_tokens, num_tokens), dtype=bool))


def causal_softmax(attn_scores: jax.Array) -> jax.Array:
    """The efficient way: -inf above the diagonal, then softmax (..., T, T) (Book §3.5.1)."""
    masked = jnp.where(causal_mask(attn_scores.shape[-1]), attn_scores, -jnp.inf)
    return jax.nn.softmax(masked, axis=-1)


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


def write_cache(cache: tuple, keys: jax.Array, values: jax.Array, positions: jax.Array) -> tuple:
    """Write new keys and values (B, H, S, Dh) into slots `positions` (B, S) of a layer's cache
    (keys, values), each (B, H, T_max, Dh). Heads come before slots, as the attention matmuls
    read them: a (B, T_max, H, Dh) cache would be transposed, whole, at every decoded token."""
    rows, heads = jnp.arange(keys.shape[0])[:, None, None], jnp.arange(keys.shape[1])[:, None]
    slots = positions[:, None, :]  # (B, 1, S)
    return cache[0].at[rows, heads, slots].set(keys), cache[1].at[rows, heads, slots].set(values)


def multi_head_attention_cached(
    params: dict, x: jax.Array, n_heads: int, cache: tuple, positions: jax.Array
) -> tuple[jax.Array, tuple]:
    """`multi_head_attention` for new tokens only, reading earlier keys and values from a cache.

    x (B, S, D) holds the tokens at `positions` (B, S); cache is (keys, values), each
    (B, H, T_max, Dh), one slot per position. The new keys and values are written into their
    slots, and each query attends to every slot at or before its own position: the same causal
    attention, without recomputing the past. Returns (B, S, D) and the updated cache.
    """
    queries, keys, values = (split_heads(y, n_heads) for y in qkv(params, x))  # (B, H, S, Dh)
    cache_k, cache_v = write_cache(cache, keys, values, positions)
    attn_scores = jnp.einsum("bhsd,bhtd->bhst", queries, cache_k)  # (B, H, S, T_max)
    slots = jnp.arange(cache_k.shape[2])  # (T_max,)
    visible = slots[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, S, T_max)
    scaled = attn_scores.astype(jnp.float32) / keys.shape[-1] ** 0.5
    attn_weights = jax.nn.softmax(jnp.where(visible, scaled, -jnp.inf), axis=-1).astype(x.dtype)
    context = jnp.einsum("bhst,bhtd->bhsd", attn_weights, cache_v)  # (B, H, S, Dh)
    return nn.linear(params["out_proj"], merge_heads(context)), (cache_k, cache_v)
