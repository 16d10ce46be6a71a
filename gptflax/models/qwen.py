"""The Qwen family (the book's bonus ch05/11): the Llama with two options, each a config field.

- `qkv_bias` (Qwen2, Qwen2.5): the query, key and value projections have biases;
- `qk_norm` (Qwen3): each head's queries and keys are RMS-normalised before the rotation, with a
  scale of their own (Llama's RMSNorm, plain `scale`, not Gemma's 1 + scale).
Qwen3 is Qwen2 without the biases and with QK-norm; both have a head size of their own (Qwen3-0.6B:
16 heads of 128 on a width of 1,024) and rotate with base 1,000,000.
"""

from __future__ import annotations

import jax

from gptflax.config import QwenConfig
from gptflax.models import llama

LOGICAL_AXES = llama.LOGICAL_AXES


def init_block(key: jax.Array, cfg: QwenConfig) -> dict:
    k_att, k_ff = jax.random.split(key)
    attention = llama.init_attention(k_att, cfg, qkv_bias=cfg.qkv_bias)
    if cfg.qk_norm:
        attention["q_norm"] = llama.init_rms_norm(cfg.head_dim)
        attention["k_norm"] = llama.init_rms_norm(cfg.head_dim)
    return {
        "att": attention,
        "ff": llama.init_feed_forward(k_ff, cfg.emb_dim, cfg.hidden_dim),
        "norm1": llama.init_rms_norm(cfg.emb_dim),
        "norm2": llama.init_rms_norm(cfg.emb_dim),
    }


def init_params(key: jax.Array, cfg: QwenConfig) -> dict:
    """Fresh Qwen params, blocks stacked; embeddings N(0, 1)."""
    return llama.init_params(key, cfg, init_block)


embed = llama.embed
final_norm = llama.final_norm


def block(
    params: dict, x: jax.Array, cfg: QwenConfig, *, layer, positions, cache=None, key=None,
    keep=None,
):  # fmt: skip
    """Llama's block, its attention with QK-norm when the config asks for it (Qwen3)."""
    qk_norm = (lambda p, y: llama.rms_norm(p, y, cfg.rms_eps)) if cfg.qk_norm else None
    return llama.block(params, x, cfg, layer=layer, positions=positions, cache=cache,
                       qk_norm=qk_norm, keep=keep)  # fmt: skip
