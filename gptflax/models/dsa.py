"""DeepSeek sparse attention (DeepSeek-V3.2; the book's bonus ch04/09_dsa): a lightning indexer
scores every earlier token for each query, cheaply, and attention reads only the top k of them.

    I_ts = sum_j w_tj ReLU(q_tj . k_s)

with `indexer_heads` small heads: queries q_tj (`indexer_dim` wide) and weights w_tj from token t,
one key k_s per token s, shared by the heads. Picking the top k passes no gradient to the
indexer, so it learns from a loss of its own (DeepSeek-V3.2's sparse stage): the KL divergence
from the main attention's weights over the chosen keys (averaged over heads) to the softmax of
its scores over them, with its input detached from the model. The indexer's keys are cached
beside the keys and values (`KVCache.index_keys`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from gptflax import nn
from gptflax.attention import (
    attend,
    init_kv_cache,
    qkv,
    split_heads,
    visible_keys,
    with_cache,
    write_kv,
)
from gptflax.config import GPTConfig

LOGICAL_AXES = {
    "indexer/W_query/kernel": ("embed", None),  # (D, indexer_heads * indexer_dim)
    "indexer/W_key/kernel": ("embed", None),  # (D, indexer_dim)
    "indexer/W_weights/kernel": ("embed", None),  # (D, indexer_heads)
}


def init_indexer(key: jax.Array, cfg: GPTConfig) -> dict:
    """The indexer's query, key and head-weight projections, no biases."""
    kq, kk, kw = jax.random.split(key, 3)
    d, heads, width = cfg.emb_dim, cfg.indexer_heads, cfg.indexer_dim
    return {
        "W_query": nn.init_linear(kq, d, heads * width, bias=False),
        "W_key": nn.init_linear(kk, d, width, bias=False),
        "W_weights": nn.init_linear(kw, d, heads, bias=False),
    }


def init_layer_cache(cfg: GPTConfig, batch_size: int, length: int, dtype):
    """Keys and values, and the indexer's keys (B, 1, C, indexer_dim), for `length` positions."""
    cache = init_kv_cache(batch_size, cfg.n_kv_heads, length, cfg.head_dim, dtype)
    index = jnp.zeros((batch_size, 1, length, cfg.indexer_dim), dtype)
    return cache._replace(index_keys=index)


def index_scores(params: dict, x: jax.Array, index_keys: jax.Array, heads: int) -> jax.Array:
    """I_ts for queries x (B, S, D) over the indexer's keys (B, T, d_I): (B, S, T)."""
    b, s, _ = x.shape
    q = nn.linear(params["W_query"], x).reshape(b, s, heads, -1)  # (B, S, H_I, d_I)
    w = nn.linear(params["W_weights"], x)  # (B, S, H_I)
    dots = jax.nn.relu(jnp.einsum("bshd,btd->bsht", q, index_keys))
    return jnp.einsum("bsh,bsht->bst", w, dots)


def top_keys(scores: jax.Array, visible: jax.Array, k: int) -> jax.Array:
    """(B, S, T) booleans: each query's k best-scored visible keys (all of them if fewer)."""
    masked = jnp.where(visible, scores, -jnp.inf)
    kth = jax.lax.top_k(masked, min(k, scores.shape[-1]))[0][..., -1:]  # (B, S, 1)
    return visible & (masked >= kth)


def indexer_loss(q, k, scores, chosen) -> jax.Array:
    """KL(main attention || indexer) over the chosen keys, averaged over queries: q (B, H, S,
    Dh), k (B, G, T, Dh), the indexer's scores and the choice (B, S, T)."""
    k = jnp.repeat(k, q.shape[1] // k.shape[1], axis=1)  # (B, H, T, Dh)
    low = jnp.finfo(jnp.float32).min
    attention = jnp.einsum("bhsd,bhtd->bhst", q, k) / math.sqrt(q.shape[-1])
    target = jax.nn.softmax(jnp.where(chosen[:, None], attention, low), -1).mean(1)  # (B, S, T)
    target = jax.lax.stop_gradient(target)
    log_indexer = jax.nn.log_softmax(jnp.where(chosen, scores, low), -1)
    per_query = jnp.sum(xlogy(target, target) - jnp.where(chosen, target * log_indexer, 0.0), -1)
    return per_query.mean()


def sparse_attention(
    params: dict, x: jax.Array, cfg: GPTConfig, *, positions, cache=None, key=None
) -> tuple[jax.Array, object]:
    """Multi-head (or grouped-query) attention of each query over its top `dsa_top_k` keys by
    the indexer: (B, T, D) -> (B, T, D), and the updated cache. In training the indexer's loss
    reaches it through the backward pass (weight `indexer_loss_coef`)."""
    queries, keys, values = qkv(params, x)
    q = split_heads(queries, cfg.n_heads)  # (B, H, T, Dh)
    k, v = (split_heads(y, cfg.n_kv_heads) for y in (keys, values))  # (B, G, T, Dh)
    detached = jax.lax.stop_gradient(x)  # the indexer learns from its own loss only
    index_keys = nn.linear(params["indexer"]["W_key"], detached)  # (B, T, d_I)
    k, v, k_pos, updated = with_cache(cache, k, v, positions)
    if cache is not None:
        index = write_kv(
            cache._replace(keys=cache.index_keys, values=cache.index_keys[..., :0]),
            index_keys[:, None], index_keys[:, None, :, :0], positions,
        ).keys  # the indexer's keys written as a one-head cache  # fmt: skip
        updated, index_keys = updated._replace(index_keys=index), index[:, 0]
    scores = index_scores(params["indexer"], detached, index_keys, cfg.indexer_heads)
    chosen = top_keys(scores, visible_keys(positions, k_pos), cfg.dsa_top_k)  # (B, T, T_k)
    context = attend(
        q, k, v, positions, k_pos, keep=chosen, drop_rate=cfg.drop_rate, key=key,
        causal=cache is None,
    )  # fmt: skip
    out = nn.linear(params["out_proj"], context)
    if cache is None and cfg.indexer_loss_coef:
        out = nn.with_aux_loss(out, indexer_loss(q, k, scores, chosen), cfg.indexer_loss_coef)
    return out, updated
