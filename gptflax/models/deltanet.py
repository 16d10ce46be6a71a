"""Gated DeltaNet (the book's bonus ch04/08_deltanet; Qwen3-Next and Qwen3.5): linear attention
whose memory of the past is one (Dh, Dh) matrix S per head instead of a growing KV cache.

Per head, each token decays the state, corrects what it recalls for its key, and is read out:

    S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T,    o_t = S_t^T q_t

with a_t = exp(g_t) in (0, 1) the gate (g_t = -exp(A_log) softplus(x W_alpha + dt_bias)) and
b_t = sigmoid(x W_beta) the write strength; q and k are L2-normed, q scaled by 1/sqrt(Dh). A short
causal depthwise convolution (`cfg.deltanet_conv` taps, then SiLU) mixes q, k and v over the last
few tokens first, and the output is RMS-normed per head and gated by SiLU(x W_gate).

Decoding runs the recurrence a token at a time (`recurrent`). Training and prefill run the same
sums chunk by chunk (`chunked`): inside a chunk the corrections solve one unit lower-triangular
system (the WY form), and only the state passes from chunk to chunk.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptflax import nn
from gptflax.attention import merge_heads, qkv, split_heads
from gptflax.config import GPTConfig
from gptflax.models.llama import rms_norm

CHUNK = 64  # tokens per chunk of the parallel form (as Qwen3-Next's kernels)

LOGICAL_AXES = {
    "W_gate/kernel": ("embed", "heads"),  # (D, H * Dh)
    "W_beta/kernel": ("embed", "heads"),  # (D, H): one write strength per head
    "W_alpha/kernel": ("embed", "heads"),  # (D, H): one decay per head
    "dt_bias": ("heads",),
    "A_log": ("heads",),
    "conv1d": (None, None, "heads"),  # (taps, 3, H * Dh): q, k and v's own filters
    "head_norm/scale": (None,),  # (Dh,)
}


class DeltaState(NamedTuple):
    """A Gated DeltaNet layer's cache: the state S (B, H, Dh, Dh) in float32, the last taps - 1
    inputs of the convolution (B, taps - 1, 3, H * Dh), and the last position taken in (B, 1),
    -1 while empty. Its size does not depend on the context."""

    state: jax.Array
    conv: jax.Array
    positions: jax.Array


def init_layer(key: jax.Array, cfg: GPTConfig) -> dict:
    """The layer's params: the query, key, value and output projections of attention, the
    output gate W_gate, W_beta and W_alpha with dt_bias and A_log, the convolution's filters and
    the per-head norm."""
    kq, kk, kv, kg, kb, ka, ks, kc, ko = jax.random.split(key, 9)
    d, h, width = cfg.emb_dim, cfg.n_heads, cfg.emb_dim
    taps = cfg.deltanet_conv
    bound = 1.0 / math.sqrt(taps)  # a depthwise filter's fan-in is its taps
    return {
        "W_query": nn.init_linear(kq, d, width, cfg.qkv_bias),
        "W_key": nn.init_linear(kk, d, width, cfg.qkv_bias),
        "W_value": nn.init_linear(kv, d, width, cfg.qkv_bias),
        "W_gate": nn.init_linear(kg, d, width, bias=False),
        "W_beta": nn.init_linear(kb, d, h, bias=False),
        "W_alpha": nn.init_linear(ka, d, h, bias=False),
        "dt_bias": jnp.ones(h),
        "A_log": jnp.log(jax.random.uniform(ks, (h,), minval=1.0, maxval=16.0)),
        "conv1d": jax.random.uniform(kc, (taps, 3, width), minval=-bound, maxval=bound),
        "head_norm": {"scale": jnp.ones(cfg.head_dim)},
        "out_proj": nn.init_linear(ko, width, d),
    }


def init_layer_cache(cfg: GPTConfig, batch_size: int, dtype) -> DeltaState:
    """An empty DeltaState."""
    h, dh = cfg.n_heads, cfg.head_dim
    return DeltaState(
        jnp.zeros((batch_size, h, dh, dh), jnp.float32),
        jnp.zeros((batch_size, cfg.deltanet_conv - 1, 3, h * dh), dtype),
        jnp.full((batch_size, 1), -1, jnp.int32),
    )


def gated_deltanet(
    params: dict, x: jax.Array, cfg: GPTConfig, *, positions: jax.Array, cache=None
) -> tuple[jax.Array, DeltaState | None]:
    """The layer: (B, T, D) -> (B, T, D), and the updated cache. Tokens at position -1
    (padding, after a row's real ones) change nothing."""
    h = cfg.n_heads
    valid = positions >= 0  # (B or 1, T)
    projected = jnp.stack(qkv(params, x), 2)  # (B, T, 3, H * Dh)
    empty = None if cache is None else cache.positions < 0  # (B, 1)
    projected, conv = short_conv(params["conv1d"], projected, cache, empty, valid)
    q, k, v = (split_heads(projected[:, :, i].astype(jnp.float32), h) for i in range(3))
    q = l2_normed(q) / math.sqrt(cfg.head_dim)
    k = l2_normed(k)
    beta = jax.nn.sigmoid(nn.linear(params["W_beta"], x).astype(jnp.float32))  # (B, T, H)
    a = nn.linear(params["W_alpha"], x).astype(jnp.float32) + params["dt_bias"]
    g = -jnp.exp(params["A_log"]) * jax.nn.softplus(a)  # (B, T, H): log of the decay
    beta, g = (jnp.where(valid[..., None], z, 0.0).transpose(0, 2, 1) for z in (beta, g))
    s0 = jnp.zeros((*q.shape[:2], q.shape[-1], v.shape[-1]))
    if cache is not None:
        s0 = jnp.where(empty[..., None, None], 0.0, cache.state)
    form = recurrent if cache is not None and x.shape[1] == 1 else chunked
    out, state = form(q, k, v, beta, g, s0)  # (B, H, T, Dh), (B, H, Dh, Dh)
    out = rms_norm(params["head_norm"], out, 1e-6).astype(x.dtype)
    gate = split_heads(nn.linear(params["W_gate"], x), h)
    out = nn.linear(params["out_proj"], merge_heads(out * jax.nn.silu(gate)))  # (B, T, D)
    if cache is None:
        return out, None
    last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)  # (B, 1)
    return out, DeltaState(state, conv, jnp.maximum(last, cache.positions))


def short_conv(weight, qkv, cache, empty, valid) -> tuple[jax.Array, jax.Array | None]:
    """Causal depthwise convolution over time, then SiLU: (B, T, 3, C) -> the same, and the
    convolution's next cached inputs (the last taps - 1 before each row's first padding)."""
    taps, t = weight.shape[0], qkv.shape[1]
    if cache is None:
        before = jnp.zeros((qkv.shape[0], taps - 1, *qkv.shape[2:]), qkv.dtype)
    else:
        before = jnp.where(empty[..., None, None], 0, cache.conv).astype(qkv.dtype)
    inputs = jnp.concatenate([before, qkv], axis=1)  # (B, taps - 1 + T, 3, C)
    out = sum(weight[j] * inputs[:, j : j + t] for j in range(taps))
    if cache is None:
        return jax.nn.silu(out), None
    taken = jnp.broadcast_to(valid, qkv.shape[:2]).sum(1)  # (B,): real tokens, padding after
    keep = jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, taps - 1))(inputs, taken)
    return jax.nn.silu(out), keep.astype(cache.conv.dtype)


def l2_normed(x: jax.Array) -> jax.Array:
    """x / |x| over the last axis (eps 1e-6 inside the root, as Qwen3-Next)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def recurrent(q, k, v, beta, g, state) -> tuple[jax.Array, jax.Array]:
    """The delta rule a token at a time: q, k, v (B, H, T, Dh), beta and g (B, H, T), the state
    (B, H, Dh, Dh) -> outputs (B, H, T, Dh) and the last state."""

    def step(s, token):
        q_t, k_t, v_t, b_t, g_t = token  # (B, H, Dh) x 3, (B, H) x 2
        s = s * jnp.exp(g_t)[..., None, None]  # decay
        recalled = jnp.einsum("bhkv,bhk->bhv", s, k_t)  # what S holds for k_t
        delta = b_t[..., None] * (v_t - recalled)
        s = s + k_t[..., :, None] * delta[..., None, :]  # write the correction
        return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

    tokens = [jnp.moveaxis(z, 2, 0) for z in (q, k, v, beta, g)]
    state, out = jax.lax.scan(step, state, tokens)
    return jnp.moveaxis(out, 0, 2), state


def chunked(q, k, v, beta, g, state, chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
    """The same outputs and last state as `recurrent`, chunk by chunk.

    Within a chunk, with G_t the summed log decays up to t and S0 the state before it, the state
    is S_t = e^{G_t} S0 + sum_{i<=t} e^{G_t - G_i} k_i u_i^T for corrections u that satisfy
    (I + A) U = beta V - beta e^G K S0, A_ti = beta_t e^{G_t - G_i} k_t.k_i (i < t): one
    triangular solve for U = W_v - W_k S0. Then O = e^G Q S0 + (Q K^T * e^{G_t - G_i}, i <= t) U
    and the next chunk starts from e^{G_C} S0 + (K e^{G_C - G})^T U."""
    b, h, t, dh = q.shape
    chunk = min(chunk, t)
    pad = -t % chunk  # padding tokens: beta = g = k = 0, so they change nothing
    q, k, v, beta, g = (
        jnp.pad(z, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 3)).reshape(
            b, h, -1, chunk, *z.shape[3:]
        )
        for z in (q, k, v, beta, g)
    )  # (B, H, N, C, Dh) and (B, H, N, C)
    g_sum = jnp.cumsum(g, axis=-1)  # (B, H, N, C): G_t
    diff = g_sum[..., :, None] - g_sum[..., None, :]  # (B, H, N, C, C): G_t - G_i
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))
    decay = jnp.exp(jnp.where(lower, diff, -jnp.inf))  # e^{G_t - G_i}, i <= t; 0 above
    a = (beta[..., None] * (k @ jnp.swapaxes(k, -1, -2)) * decay) * ~jnp.eye(chunk, dtype=bool)
    rhs = jnp.concatenate([beta[..., None] * v, (beta * jnp.exp(g_sum))[..., None] * k], -1)
    solved = jax.lax.linalg.triangular_solve(
        a, rhs, left_side=True, lower=True, unit_diagonal=True
    )  # (I + A)^{-1} [beta V, beta e^G K]
    w_v, w_k = solved[..., :dh], solved[..., dh:]
    q_decayed = q * jnp.exp(g_sum)[..., None]
    scores = (q @ jnp.swapaxes(k, -1, -2)) * decay  # (B, H, N, C, C)
    last = g_sum[..., -1:]  # (B, H, N, 1): G_C
    k_to_end = k * jnp.exp(last - g_sum)[..., None]

    def step(s, c):  # s (B, H, Dh, Dh); c: one chunk of each
        w_v, w_k, q_decayed, scores, k_to_end, last = c
        u = w_v - w_k @ s  # (B, H, C, Dh)
        out = q_decayed @ s + scores @ u
        s = jnp.exp(last)[..., None] * s + jnp.swapaxes(k_to_end, -1, -2) @ u
        return s, out

    per_chunk = (w_v, w_k, q_decayed, scores, k_to_end, last)
    state, out = jax.lax.scan(step, state, [jnp.moveaxis(z, 2, 0) for z in per_chunk])
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, -1, dh)[:, :, :t]  # (B, H, T, Dh)
    return out, state
