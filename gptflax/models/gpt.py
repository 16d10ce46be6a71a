"""The GPT family (chapter 4): the model's pieces as pure functions over a params pytree.

Params use the book's names: `tok_emb`, `pos_emb`, `trf_blocks` (`att`, `ff`, `norm1`, `norm2`),
`final_norm`, `out_head`. The transformer blocks are stacked: every leaf under `trf_blocks` has a
leading axis of length `n_layers`. `gptflax.models.transformer` runs the pieces in order (Book
§4.6's forward), with and without a KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptflax import nn
from gptflax.attention import init_multi_head_attention, self_attention
from gptflax.config import GPTConfig

# The logical axes of the params, by path: what each dimension is, so that `gptflax.parallel` can
# split it over a device mesh for a sharding strategy. A bias follows its kernel's output axis;
# the stacked "trf_blocks" add a leading layer axis.
LOGICAL_AXES = {
    "tok_emb/embedding": ("vocab", "embed"),  # (V, D)
    "pos_emb/embedding": (None, "embed"),  # (context, D)
    "W_query/kernel": ("embed", "heads"),  # (D, H * Dh)
    "W_key/kernel": ("embed", "heads"),
    "W_value/kernel": ("embed", "heads"),
    "out_proj/kernel": ("heads", "embed"),
    "fc1/kernel": ("embed", "mlp"),  # (D, 4D)
    "fc2/kernel": ("mlp", "embed"),
    "scale": ("embed",),  # layer norms
    "shift": ("embed",),
    "out_head/kernel": ("embed", "vocab"),  # (D, V), or (D, classes) after chapter 6
}


def init_feed_forward(key: jax.Array, emb_dim: int) -> dict:
    """Two linear layers, D -> 4D -> D: the book's ff.layers[0] and ff.layers[2]."""
    k1, k2 = jax.random.split(key)
    return {
        "fc1": nn.init_linear(k1, emb_dim, 4 * emb_dim),
        "fc2": nn.init_linear(k2, 4 * emb_dim, emb_dim),
    }


def feed_forward(params: dict, x: jax.Array) -> jax.Array:
    """Expand, GELU, contract: (B, T, D) -> (B, T, D) (Book §4.3)."""
    return nn.linear(params["fc2"], nn.gelu(nn.linear(params["fc1"], x)))  # via (B, T, 4D)


def init_block(key: jax.Array, cfg: GPTConfig) -> dict:
    """Params of one transformer block (Book §4.5)."""
    k_att, k_ff = jax.random.split(key)
    return {
        "att": init_multi_head_attention(k_att, cfg.emb_dim, cfg.emb_dim, cfg.qkv_bias),
        "ff": init_feed_forward(k_ff, cfg.emb_dim),
        "norm1": nn.init_layer_norm(cfg.emb_dim),
        "norm2": nn.init_layer_norm(cfg.emb_dim),
    }


def init_params(key: jax.Array, cfg: GPTConfig) -> dict:
    """Fresh GPT params with the blocks stacked along a leading n_layers axis (Book §4.6)."""
    k_tok, k_pos, k_blocks, k_head = jax.random.split(key, 4)
    block_keys = jax.random.split(k_blocks, cfg.n_layers)
    return {
        "tok_emb": nn.init_embedding(k_tok, cfg.vocab_size, cfg.emb_dim),
        "pos_emb": nn.init_embedding(k_pos, cfg.context_length, cfg.emb_dim),
        "trf_blocks": jax.vmap(lambda k: init_block(k, cfg))(block_keys),
        "final_norm": nn.init_layer_norm(cfg.emb_dim),
        "out_head": nn.init_linear(k_head, cfg.emb_dim, cfg.vocab_size, bias=False),
    }


def embed(
    params: dict, tokens: jax.Array, cfg: GPTConfig, *, positions: jax.Array, key=None
) -> jax.Array:
    """Token plus positional embeddings, then dropout: (B, T) ids -> (B, T, D) (Book §4.6)."""
    with jax.named_scope("embed"):
        tok_embeds = nn.embedding(params["tok_emb"], tokens)  # (B, T, D)
        pos_embeds = nn.embedding(params["pos_emb"], jnp.maximum(positions, 0))  # (B or 1, T, D)
        return nn.dropout(tok_embeds + pos_embeds, cfg.drop_rate, key)


def block(
    params: dict,
    x: jax.Array,
    cfg: GPTConfig,
    *,
    layer,
    positions: jax.Array,
    cache=None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, object]:
    """Pre-norm transformer block with shortcut connections: (B, T, D) -> (B, T, D) (Book §4.5);
    with a layer cache, the attention reads earlier positions from it (returned updated)."""
    k_att, k_drop1, k_drop2 = nn.split_key(key, 3)
    with jax.named_scope("attention"):
        shortcut = x
        x = nn.layer_norm(params["norm1"], x)
        x, cache = self_attention(
            params["att"], x, cfg.n_heads, positions=positions, cache=cache,
            drop_rate=cfg.drop_rate, key=k_att, fused=cfg.fused_attention,
        )  # fmt: skip
        x = nn.dropout(x, cfg.drop_rate, k_drop1) + shortcut
    with jax.named_scope("feed_forward"):
        shortcut = x
        x = feed_forward(params["ff"], nn.layer_norm(params["norm2"], x))
        return nn.dropout(x, cfg.drop_rate, k_drop2) + shortcut, cache


def final_norm(params: dict, x: jax.Array, cfg: GPTConfig) -> jax.Array:
    """The layer norm after the last block: (B, T, D) -> (B, T, D)."""
    with jax.named_scope("final_norm"):
        return nn.layer_norm(params["final_norm"], x)
