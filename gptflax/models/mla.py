"""Multi-head latent attention (MLA, DeepSeek-V2; Book ch04/05_mla), the GPT's attention when
`cfg.latent_dim` is set.

Keys and values are up-projected from one shared latent c = x W_DKV (B, T, r), and only c is
cached: r numbers per token and layer instead of 2 x D. Queries are not compressed and there is
no RoPE (the GPT's positions are a table). In training the latent is up-projected (`plain`); in
decoding the up-projections are absorbed (`absorbed`): W_UK into the queries, since
q . (W_UK^T c) = (W_UK q) . c, and W_UV into the output projection, so attention reads the
cached latent directly, as multi-query attention over one r-wide key/value head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gptflax import nn
from gptflax.attention import KVCache, attend, init_kv_cache, split_heads, with_cache
from gptflax.config import GPTConfig
from gptflax.decoding import TransposedKernel

LOGICAL_AXES = {
    "W_DKV/kernel": ("embed", None),  # (D, r)
    "W_UK/kernel": (None, "heads"),  # (r, H * Dh)
    "W_UV/kernel": (None, "heads"),
}


def init_attention(key: jax.Array, cfg: GPTConfig) -> dict:
    """W_query (D, D), the down-projection W_DKV (D, r), the up-projections W_UK and W_UV (r, D),
    out_proj (D, D) with its bias; no other biases."""
    kq, kd, kk, kv, ko = jax.random.split(key, 5)
    d, r = cfg.emb_dim, cfg.latent_dim
    return {
        "W_query": nn.init_linear(kq, d, d, bias=False),
        "W_DKV": nn.init_linear(kd, d, r, bias=False),
        "W_UK": nn.init_linear(kk, r, d, bias=False),
        "W_UV": nn.init_linear(kv, r, d, bias=False),
        "out_proj": nn.init_linear(ko, d, d),
    }


def init_layer_cache(cfg: GPTConfig, layer: int, batch_size: int, length: int, dtype) -> KVCache:
    """The latent cache: the latent as the keys of one head (B, 1, C, r), values empty (width
    0; the latent serves as both), a ring of the window's slots on a sliding-window layer."""
    slots = min(length, cfg.kv_window(layer) or length)
    return init_kv_cache(batch_size, 1, slots, cfg.latent_dim, dtype, value_dim=0)


def plain(
    params: dict, x: jax.Array, cfg: GPTConfig, *, positions, window=None, drop_rate=0.0, key=None
) -> jax.Array:
    """MLA as the book writes it: keys and values up-projected from the latent, then multi-head
    attention: (B, T, D) -> (B, T, D)."""
    q = split_heads(nn.linear(params["W_query"], x), cfg.n_heads)  # (B, H, T, Dh)
    latent = nn.linear(params["W_DKV"], x)  # (B, T, r)
    k = split_heads(nn.linear(params["W_UK"], latent), cfg.n_heads)
    v = split_heads(nn.linear(params["W_UV"], latent), cfg.n_heads)
    context = attend(
        q, k, v, positions, positions, window=window, drop_rate=drop_rate, key=key, causal=True
    )  # (B, T, D)
    return nn.linear(params["out_proj"], context)


def absorbed(
    params: dict, x: jax.Array, cfg: GPTConfig, *, positions, cache=None, window=None
) -> tuple[jax.Array, KVCache | None]:
    """MLA with W_UK absorbed into the queries and W_UV into the output projection, reading the
    latents of earlier positions from the layer's `cache`: ((B, T, D), the updated cache)."""
    h, dh, r = cfg.n_heads, cfg.head_dim, cfg.latent_dim
    q = split_heads(nn.linear(params["W_query"], x), h)  # (B, H, T, Dh)
    w_uk = _kernel(params["W_UK"]).reshape(r, h, dh)
    q_latent = jnp.einsum("bhtd,rhd->bhtr", q, w_uk)  # (B, H, T, r)
    latent = nn.linear(params["W_DKV"], x)[:, None]  # (B, 1, T, r): one key/value head
    latent, _, k_pos, cache = with_cache(cache, latent, latent[..., :0], positions, window)
    context = attend(
        q_latent, latent, latent, positions, k_pos, window=window, scale=1 / math.sqrt(dh)
    )  # (B, T, H * r)
    w_uv = _kernel(params["W_UV"]).reshape(r, h, dh)
    w_out = _kernel(params["out_proj"]).reshape(h, dh, -1)
    merged = {"kernel": jnp.einsum("rhd,hde->hre", w_uv, w_out).reshape(h * r, -1)}
    return nn.linear({**params["out_proj"], **merged}, context), cache


def _kernel(linear_params: dict) -> jax.Array:
    """A linear layer's (d_in, d_out) weight, also from the decoding layout."""
    kernel = linear_params["kernel"]
    return kernel.w_t.T if isinstance(kernel, TransposedKernel) else kernel
