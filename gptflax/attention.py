"""Causal multi-head attention, the final form of chapter 3 (lab 3 derives the steps to it), and
the KV cache that every model family decodes with.

Every function is pure: weights come in as dicts of arrays (see `gptflax.nn`), dropout takes an
explicit PRNG key, and `key=None` means no dropout (evaluation). Which keys a query may see is
decided by positions: key position <= query position (causal), and, with a sliding `window`,
query position - key position < window. Without a cache both are 0..T-1; with one, the keys are
the cache's slots, each holding the position written into it (-1: empty).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptflax import nn

QKV = ("W_query", "W_key", "W_value")  # the names of the query, key and value projections


def init_qkv(
    key: jax.Array, d_in: int, d_out: int, qkv_bias: bool = False, kv_dim: int | None = None
) -> dict:
    """Query, key and value linear layers (Book §3.4.2's v2, and every attention after it); keys
    and values of `kv_dim` (default d_out) for grouped-query attention."""
    keys = jax.random.split(key, 3)
    dims = (d_out, kv_dim or d_out, kv_dim or d_out)
    return {
        n: nn.init_linear(k, d_in, d, bias=qkv_bias)
        for n, k, d in zip(QKV, keys, dims, strict=True)
    }


def qkv(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Project x (..., d_in) to queries, keys and values (..., d_out) each; in one matmul where
    the decoding layout joined the three projections (`W_qkv`, see `gptflax.decoding`)."""
    if "W_qkv" in params:
        return params["W_qkv"](x)
    return tuple(nn.linear(params[n], x) for n in QKV)


def causal_mask(num_tokens: int) -> jax.Array:
    """(T, T) booleans, True where a query may attend: on and below the diagonal (Book §3.5)."""
    return jnp.tril(jnp.ones((num_tokens, num_tokens), dtype=bool))


def causal_softmax(attn_scores: jax.Array) -> jax.Array:
    """The efficient way: -inf above the diagonal, then softmax (..., T, T) (Book §3.5.1)."""
    masked = jnp.where(causal_mask(attn_scores.shape[-1]), attn_scores, -jnp.inf)
    return jax.nn.softmax(masked, axis=-1)


def init_multi_head_attention(
    key: jax.Array, d_in: int, d_out: int, qkv_bias: bool = False, kv_dim: int | None = None
) -> dict:
    """Fused query/key/value projections for all heads, and the output projection (Book §3.6.2);
    keys and values of `kv_dim` for grouped-query attention."""
    k_qkv, k_out = jax.random.split(key)
    return {
        **init_qkv(k_qkv, d_in, d_out, qkv_bias, kv_dim),
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


def visible_keys(q_pos: jax.Array, k_pos: jax.Array, window=None) -> jax.Array:
    """(B or 1, S, T) booleans: which keys each query may see, from query positions (B or 1, S)
    and key positions (B or 1, T): written (>= 0), not after the query, and with a `window`
    (an int, or a traced one: a layer's), fewer than `window` positions before it."""
    k, q = k_pos[:, None, :], q_pos[:, :, None]
    visible = (k >= 0) & (k <= q)
    return visible if window is None else visible & (q - k < window)


def fused_implementation(dtype) -> str | None:
    """Which kernel `jax.nn.dot_product_attention` must use, named so that nothing falls back
    silently: cuDNN's flash attention on an NVIDIA GPU (it takes bf16 or fp16 only), else XLA's."""
    if jax.default_backend() != "gpu":
        return "xla"
    if dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"fused attention on a GPU runs cuDNN's flash attention, which takes bf16 or fp16, "
            f"not {jnp.dtype(dtype).name}: train in bf16 (--bf16), or leave fused attention off"
        )
    return "cudnn"


# Queries per block when a sequence attends to itself (`attend`'s `causal`). On 512 tokens, blocks
# of 128 compute 10/16 of the scores; SmolLM2's train step on a CPU ran 5% faster than unblocked
# (blocks of 64: no faster than 128).
QUERY_BLOCK = 128


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    window=None,
    scale: float | None = None,
    drop_rate: float = 0.0,
    key: jax.Array | None = None,
    causal: bool = False,
    fused: bool = False,
    keep: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention of queries q (B, H, S, Dh) over keys and values k, v (B, G, T,
    Dh), G dividing H: query head h reads key/value head h // (H / G) (grouped-query attention;
    G = H is chapter 3's multi-head attention). Returns the context (B, S, H * Dh). `keep`
    (B, S, T) limits each query to some of the keys it may see.

    Scores are divided by sqrt(Dh) (or multiplied by `scale`), masked by `visible_keys`, and
    softmaxed in float32 (`attention_weights`); dropout on the weights (Book §3.5.2). Without
    dropout, the backward pass is our own (`softmax_attention`).

    `causal` says that the keys are the queries' own and that no query sees a key at a later
    index (a sequence attending to itself, as in training, or packed rows). Then `fused` hands
    the attention to `jax.nn.dot_product_attention` (cuDNN's flash attention on a GPU; no
    dropout); otherwise the queries go QUERY_BLOCK at a time, each block over the keys up to its
    own last, so that the scores above the diagonal's blocks, which the mask would zero, are
    never computed (not with attention dropout, whose random mask is drawn for the whole
    sequence at once)."""
    b, h, s, dh = q.shape
    g = k.shape[1]
    if causal and fused and keep is None and not isinstance(window, jax.Array):
        local = None if window is None else (window - 1, 0)
        out = jax.nn.dot_product_attention(
            *(y.transpose(0, 2, 1, 3) for y in (q, k, v)), scale=scale, is_causal=True,
            local_window_size=local, implementation=fused_implementation(q.dtype),
        )  # fmt: skip
        return out.reshape(b, s, h * dh)  # (B, S, H, Dh) -> (B, S, H * Dh)
    if causal and s > QUERY_BLOCK and (key is None or not drop_rate):  # one dropout mask, as ever
        blocks = []
        for start in range(0, s, QUERY_BLOCK):
            stop = min(s, start + QUERY_BLOCK)  # queries start..stop see keys 0..stop at most
            blocks.append(attend(
                q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], q_pos[:, start:stop],
                k_pos[:, :stop], window=window, scale=scale,
                keep=None if keep is None else keep[:, start:stop, :stop],
            ))  # fmt: skip
        return jnp.concatenate(blocks, axis=1)  # (B, S, H * Dh)
    visible = visible_keys(q_pos, k_pos, window)  # (B or 1, S, T)
    if keep is not None:  # a chosen subset of the keys (DeepSeek sparse attention)
        visible = visible & keep
    # The R = H / G query heads that share a key/value head, one after another: (B, G, R * S, Dh)
    r, t = h // g, k.shape[2]
    q = q.reshape(b, g, r * s, dh)
    visible = jnp.broadcast_to(visible[:, None, None], (visible.shape[0], 1, r, s, t))
    visible = visible.reshape(-1, 1, r * s, t)  # (B or 1, 1, R * S, T)
    if key is not None and drop_rate:  # dropout on the weights (Book §3.5.2): JAX's backward
        weights = attention_weights(q, k, visible, scale).astype(v.dtype)
        context = jnp.einsum("bgst,bgtd->bgsd", nn.dropout(weights, drop_rate, key), v)
    else:
        context = softmax_attention(q, k, v, visible, scale)
    return merge_heads(context.reshape(b, h, s, -1))  # (B, G, R * S, Dv) -> (B, S, H * Dv)


def attention_weights(q: jax.Array, k: jax.Array, visible: jax.Array, scale=None) -> jax.Array:
    """Softmax weights (B, G, S, T), float32, of queries q (B, G, S, Dh) over keys k (B, G, T,
    Dh): scores divided by sqrt(Dh) (or times `scale`), -inf where not `visible` (Book §3.5).
    The einsum lets XLA's CPU dot read a cache's keys as they lie, not transposed whole."""
    scores = jnp.einsum("bgsd,bgtd->bgst", q, k).astype(jnp.float32)
    scores = _scaled(scores, q.shape[-1], scale)
    # The book masks with -inf; the float32 minimum gives the same weights, and a query that sees
    # nothing (padding) finite ones instead of NaNs, which would reach other rows through 0 * NaN.
    return jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)


def _scaled(x: jax.Array, head_dim: int, scale=None) -> jax.Array:
    """x divided by sqrt(head_dim) (Book §3.4.1), or times `scale` where a model sets its own."""
    return x / math.sqrt(head_dim) if scale is None else x * scale


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_attention(q, k, v, visible, scale=None) -> jax.Array:
    """The context (B, G, S, Dv): `attention_weights` times values v (B, G, T, Dv), with its
    backward pass written out (`_softmax_attention_bwd`)."""
    return _softmax_attention_fwd(q, k, v, visible, scale)[0]


def _softmax_attention_fwd(q, k, v, visible, scale):
    weights = attention_weights(q, k, visible, scale).astype(v.dtype)  # (B, G, S, T)
    context = jnp.einsum("bgst,bgtd->bgsd", weights, v)
    return context, (q, k, v, visible, weights, context)


def _softmax_attention_bwd(scale, saved, d_context):
    """The backward pass of context O = W V, weights W = softmax(S), scores S = Q K^T * scale:
    dV = W^T dO and dW = dO V^T; then the softmax's dS = W * (dW - sum_t W dW), where the sum
    over the T keys equals dO . O, a sum over Dv only (sum_t W dO V^T = dO (W V)^T); masked
    scores get no gradient; dQ = dS K * scale and dK = dS^T Q * scale.

    dK and dV are computed as (B, G, Dh, T) and transposed after, behind a barrier that keeps
    XLA from folding the transpose back into the matmul: so its CPU dot reads the (S, T) arrays
    as they lie, where JAX's own backward pass has them copied transposed first. Attention's
    forward and backward at SmolLM2's train shapes: 43 ms a layer against 53."""
    q, k, v, visible, weights, context = saved
    d_weights = jnp.einsum("bgsd,bgtd->bgst", d_context, v).astype(jnp.float32)
    row_sums = jnp.sum(d_context.astype(jnp.float32) * context, axis=-1, keepdims=True)
    d_scores = jnp.where(visible, weights * (d_weights - row_sums), 0.0)  # (B, G, S, T)
    d_scores = _scaled(d_scores, q.shape[-1], scale)  # the scores' own scaling, backward
    d_scores = d_scores.astype(q.dtype)
    d_q = jnp.einsum("bgst,bgtd->bgsd", d_scores, k)  # (B, G, S, Dh)
    d_k_t, d_v_t = jax.lax.optimization_barrier((
        jnp.einsum("bgsd,bgst->bgdt", q, d_scores),
        jnp.einsum("bgsd,bgst->bgdt", d_context, weights),
    ))  # fmt: skip
    return d_q, d_k_t.swapaxes(-1, -2), d_v_t.swapaxes(-1, -2), None  # (B, G, T, Dh or Dv)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


# --- the KV cache ---------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """One layer's cache: keys and values (B, G, C, Dh) and the position each of the C slots
    holds (B, C), -1 where nothing was written. Heads come before slots, as the attention matmuls
    read them (a (B, C, G, Dh) cache would be transposed, whole, at every decoded token).

    A layer that sees all earlier positions gets one slot per position; a sliding-window layer
    only `window` slots, used as a ring: position p goes into slot p % C. DeepSeek sparse
    attention also keeps its indexer's keys (B, 1, C, d_I) (`gptflax.models.dsa`)."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    index_keys: jax.Array | None = None


def init_kv_cache(
    batch_size: int, n_kv_heads: int, length: int, head_dim: int, dtype, value_dim=None
) -> KVCache:
    """An empty layer cache of `length` slots; values of `value_dim` (default head_dim) each."""
    shape = (batch_size, n_kv_heads, length)
    empty = jnp.full((batch_size, length), -1, jnp.int32)
    values = jnp.zeros((*shape, head_dim if value_dim is None else value_dim), dtype)
    return KVCache(jnp.zeros((*shape, head_dim), dtype), values, empty)


def write_kv(cache: KVCache, keys: jax.Array, values: jax.Array, positions: jax.Array) -> KVCache:
    """Write new keys and values (B, G, S, Dh) at `positions` (B, S) into slots position % C.
    Padding (position -1) is not written, nor a position that a later one of the same row
    overwrites in a ring (so no slot is written twice)."""
    b, g, c = cache.keys.shape[:3]
    last = positions.max(axis=1, keepdims=True)  # (B, 1)
    keep = (positions >= 0) & (positions > last - c)
    slots = jnp.where(keep, positions % c, c)  # slot c lies outside the cache: dropped
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(g)[:, None]
    at = (rows, heads, slots[:, None, :])  # (B, 1, 1), (G, 1), (B, 1, S)
    return cache._replace(
        keys=cache.keys.at[at].set(keys, mode="drop"),
        values=cache.values.at[at].set(values, mode="drop"),
        positions=cache.positions.at[rows[:, 0], slots].set(positions, mode="drop"),
    )


def with_cache(cache: KVCache | None, keys, values, positions, window=None) -> tuple:
    """The keys and values new queries at `positions` (B or 1, S) attend to, with their positions,
    and the updated cache: (keys, values, key positions, cache).

    Without a cache they are the new ones. With one, the new ones are written in first and the
    queries read the whole cache; except when several tokens enter a sliding-window ring, where
    later ones could overwrite what earlier ones still see: those read the old cache and the new
    keys side by side."""
    if cache is None:
        return keys, values, positions, None
    updated = write_kv(cache, keys, values, positions)
    if window is not None and keys.shape[2] > 1 and cache.keys.shape[2] <= window:
        return (
            jnp.concatenate([cache.keys, keys], axis=2),
            jnp.concatenate([cache.values, values], axis=2),
            jnp.concatenate([cache.positions, positions], axis=1),
            updated,
        )
    return updated.keys, updated.values, updated.positions, updated


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
    `fused` hands the attention itself to `jax.nn.dot_product_attention` (cuDNN flash attention
    on a GPU; no attention dropout)."""
    return self_attention(params, x, n_heads, drop_rate=drop_rate, key=key, fused=fused)[0]


def self_attention(
    params: dict,
    x: jax.Array,
    n_heads: int,
    *,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    drop_rate: float = 0.0,
    key: jax.Array | None = None,
    fused: bool = False,
    n_kv_heads: int | None = None,
    window=None,
    keep: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """`multi_head_attention` of tokens at `positions` (B or 1, T; default 0..T-1), reading the
    earlier positions' keys and values from a layer's `cache` when there is one: ((B, T, D), the
    updated cache or None). `n_kv_heads` key/value heads (default n_heads) make it grouped-query
    attention, a `window` sliding-window attention (the book's bonus ch04/04_gqa, 06_swa); `keep`
    (B, T, T) limits what each token sees further (`attend`)."""
    queries, keys, values = qkv(params, x)
    queries = split_heads(queries, n_heads)  # (B, H, T, Dh)
    keys, values = (split_heads(y, n_kv_heads or n_heads) for y in (keys, values))  # (B, G, T, Dh)
    q_pos = jnp.arange(x.shape[1])[None] if positions is None else positions  # (B or 1, T)
    keys, values, k_pos, cache = with_cache(cache, keys, values, q_pos, window)
    context = attend(
        queries, keys, values, q_pos, k_pos, window=window, drop_rate=drop_rate, key=key,
        causal=cache is None, fused=fused, keep=keep,
    )  # fmt: skip
    return nn.linear(params["out_proj"], context), cache  # (B, T, D)
