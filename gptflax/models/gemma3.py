"""The Gemma 3 family (the book's bonus ch05/12): the Llama with five changes.

- Sliding windows: five of every six layers attend only to the last `sliding_window` positions
  (512 in Gemma 3 270M), so their KV cache is a ring of that many slots whatever the context;
  every sixth layer sees everything. The two kinds rotate positions at different speeds (rotary
  bases 10,000 and 1,000,000).
- QK-norm: each head's queries and keys are RMS-normalised before the rotation, and scores are
  scaled by 1/sqrt(query_pre_attn_scalar).
- Four norms a block: the attention's and the feed-forward's outputs are normalised too, before
  they join the shortcut. Gemma's RMSNorm multiplies by (1 + scale), its scale starting at 0.
- GeGLU: the gated feed-forward with GELU (tanh form) for SiLU.
- The token embeddings are scaled by sqrt(emb_dim). The head is tied to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptflax import nn
from gptflax.config import Gemma3Config
from gptflax.models import llama
from gptflax.rope import rope_frequencies

LOGICAL_AXES = llama.LOGICAL_AXES  # the post-norms are RMSNorms ("scale") too


def init_norm(dim: int) -> dict:
    return {"scale": jnp.zeros((dim,))}


def rms_norm(params: dict, x: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + scale), all in float32: (..., D)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + params["scale"].astype(jnp.float32))).astype(x.dtype)


def init_block(key: jax.Array, cfg: Gemma3Config) -> dict:
    k_att, k_ff = jax.random.split(key)
    attention = llama.init_attention(k_att, cfg)
    attention["q_norm"], attention["k_norm"] = init_norm(cfg.head_dim), init_norm(cfg.head_dim)
    return {
        "att": attention,
        "ff": llama.init_feed_forward(k_ff, cfg.emb_dim, cfg.hidden_dim),
        "norm1": init_norm(cfg.emb_dim),
        "post_att_norm": init_norm(cfg.emb_dim),
        "norm2": init_norm(cfg.emb_dim),
        "post_ff_norm": init_norm(cfg.emb_dim),
    }


def init_params(key: jax.Array, cfg: Gemma3Config) -> dict:
    """Fresh Gemma 3 params (tied head), blocks stacked; embeddings N(0, 1), norms at 1 + 0."""
    params = llama.init_params(key, cfg, init_block)
    params["final_norm"] = init_norm(cfg.emb_dim)
    return params


def embed(params: dict, tokens: jax.Array, cfg: Gemma3Config, *, positions, key=None):
    """Token embeddings times sqrt(emb_dim), the factor rounded to their dtype: (B, T, D)."""
    with jax.named_scope("embed"):
        x = nn.embedding(params["tok_emb"], tokens)
        return x * jnp.asarray(cfg.emb_dim**0.5, x.dtype)


def layer_window(cfg: Gemma3Config, layer):
    """The layer's sliding window, None for a global one; a traced layer (inside the layer scan)
    gets a traced window, global ones one longer than any distance between positions."""
    if isinstance(layer, int):
        return cfg.kv_window(layer)
    return jnp.where(cfg.is_global(layer), jnp.iinfo(jnp.int32).max, cfg.sliding_window)


def block(
    params: dict, x: jax.Array, cfg: Gemma3Config, *, layer, positions, cache=None, key=None,
    keep=None,
):  # fmt: skip
    """A Gemma 3 block: (B, T, D) -> (B, T, D), and the layer's updated cache (`keep`: a packed
    row's mask, see `llama.attention`)."""
    inv_freq = jnp.where(
        cfg.is_global(layer),
        rope_frequencies(cfg.head_dim, cfg.rope_base),
        rope_frequencies(cfg.head_dim, cfg.rope_local_base),
    )
    with jax.named_scope("attention"):
        att, cache = llama.attention(
            params["att"], rms_norm(params["norm1"], x, cfg.rms_eps), cfg, positions=positions,
            cache=cache, inv_freq=inv_freq, window=layer_window(cfg, layer),
            scale=cfg.query_pre_attn_scalar**-0.5,
            qk_norm=lambda p, y: rms_norm(p, y, cfg.rms_eps), keep=keep,
        )  # fmt: skip
        x = x + rms_norm(params["post_att_norm"], att, cfg.rms_eps)
    with jax.named_scope("feed_forward"):
        ff = llama.feed_forward(params["ff"], rms_norm(params["norm2"], x, cfg.rms_eps), nn.gelu)
        return x + rms_norm(params["post_ff_norm"], ff, cfg.rms_eps), cache


def final_norm(params: dict, x: jax.Array, cfg: Gemma3Config) -> jax.Array:
    with jax.named_scope("final_norm"):
        return rms_norm(params["final_norm"], x, cfg.rms_eps)
