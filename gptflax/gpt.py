"""The GPT family (chapter 4): the model as pure functions over a params pytree.

Params use the book's names: `tok_emb`, `pos_emb`, `trf_blocks` (`att`, `ff`, `norm1`, `norm2`),
`final_norm`, `out_head`. The transformer blocks are stacked: every leaf under `trf_blocks` has a
leading axis of length `n_layers`, and `forward` runs them with `nn.scan_layers`: a `jax.lax.scan`,
which on a CPU compiles one block instead of n_layers copies (unrolled on accelerators).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptflax import nn
from gptflax.attention import (
    init_multi_head_attention,
    multi_head_attention,
    multi_head_attention_cached,
)
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


def block(params: dict, x: jax.Array, cfg: GPTConfig, *, key: jax.Array | None = None) -> jax.Array:
    """Pre-norm transformer block with shortcut connections: (B, T, D) -> (B, T, D) (Book §4.5)."""
    k_att, k_drop1, k_drop2 = nn.split_key(key, 3)
    with jax.named_scope("attention"):
        shortcut = x
        x = nn.layer_norm(params["norm1"], x)
        x = multi_head_attention(
            params["att"], x, cfg.n_heads, drop_rate=cfg.drop_rate, key=k_att,
            fused=cfg.fused_attention,
        )  # fmt: skip
        x = nn.dropout(x, cfg.drop_rate, k_drop1) + shortcut
    with jax.named_scope("feed_forward"):
        shortcut = x
        x = feed_forward(params["ff"], nn.layer_norm(params["norm2"], x))
        return nn.dropout(x, cfg.drop_rate, k_drop2) + shortcut


def embed(
    params: dict, tokens: jax.Array, cfg: GPTConfig, *, key: jax.Array | None = None
) -> jax.Array:
    """Token plus positional embeddings, then dropout: (B, T) ids -> (B, T, D) (Book §4.6)."""
    num_tokens = tokens.shape[-1]
    if num_tokens > cfg.context_length:
        raise ValueError(
            f"{num_tokens} tokens exceed the context length of {cfg.context_length}: "
            "keep only the last context_length tokens (e.g. tokens[:, -context_length:])"
        )
    with jax.named_scope("embed"):
        tok_embeds = nn.embedding(params["tok_emb"], tokens)  # (B, T, D)
        pos_embeds = nn.embedding(params["pos_emb"], jnp.arange(num_tokens))  # (T, D)
        return nn.dropout(tok_embeds + pos_embeds, cfg.drop_rate, key)


def run_blocks(
    blocks: dict, x: jax.Array, cfg: GPTConfig, *, key: jax.Array | None = None
) -> jax.Array:
    """Run stacked transformer blocks in order (`nn.scan_layers`): (B, T, D) -> (B, T, D)."""
    n_layers = jax.tree.leaves(blocks)[0].shape[0]
    layer_keys = jax.random.split(key, n_layers) if key is not None else None

    def step(x, layer):
        layer_params, layer_key = layer
        with jax.named_scope("block"):
            return block(layer_params, x, cfg, key=layer_key), None

    return nn.scan_layers(step, x, (blocks, layer_keys))


def final_norm(params: dict, x: jax.Array, cfg: GPTConfig) -> jax.Array:
    """The layer norm after the last block: (B, T, D) -> (B, T, D)."""
    with jax.named_scope("final_norm"):
        return nn.layer_norm(params["final_norm"], x)


def head(params: dict, h: jax.Array) -> jax.Array:
    """The output head: normed hidden states (B, T, D) -> (B, T, V) logits."""
    with jax.named_scope("head"):
        return nn.linear(params["out_head"], h)


def hidden(
    params: dict, tokens: jax.Array, cfg: GPTConfig, *, key: jax.Array | None = None
) -> jax.Array:
    """(B, T) ids -> (B, T, D) final hidden states, what the output head reads (Book §4.6)."""
    k_emb, k_blocks = nn.split_key(key, 2)
    x = embed(params, tokens, cfg, key=k_emb)  # (B, T, D)
    return final_norm(params, run_blocks(params["trf_blocks"], x, cfg, key=k_blocks), cfg)


def forward(
    params: dict, tokens: jax.Array, cfg: GPTConfig, *, key: jax.Array | None = None
) -> jax.Array:
    """The GPT model: (B, T) ids -> (B, T, V) logits; a `key` turns dropout on (Book §4.6)."""
    return head(params, hidden(params, tokens, cfg, key=key))


def init_cache(cfg: GPTConfig, batch_size: int, length: int, dtype=jnp.float32) -> tuple:
    """An empty KV cache of `length` positions: one (keys, values) pair per layer, (B, H, length,
    Dh) each. Separate arrays per layer, so a decoding step updates each in place."""
    shape = (batch_size, cfg.n_heads, length, cfg.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers))


def block_cached(
    params: dict, x: jax.Array, cfg: GPTConfig, cache: tuple, positions: jax.Array
) -> tuple[jax.Array, tuple]:
    """`block` in eval mode for new tokens at `positions` (B, S), with this layer's KV cache."""
    x_norm = nn.layer_norm(params["norm1"], x)
    att, cache = multi_head_attention_cached(params["att"], x_norm, cfg.n_heads, cache, positions)
    x = x + att
    return x + feed_forward(params["ff"], nn.layer_norm(params["norm2"], x)), cache


def hidden_cached(
    params: dict, tokens: jax.Array, cache: tuple, start: jax.Array, cfg: GPTConfig
) -> tuple[jax.Array, tuple]:
    """Eval-mode `hidden` for new tokens only: row b of tokens (B, S) sits at positions start[b],
    start[b] + 1, ...; earlier positions come from the cache (`init_cache`), which is returned
    updated. Prefill with start = 0, then feed one token at a time: (B, S, D) final hidden
    states, for `head` to turn into logits where they are needed.

    The layers run as a Python loop over `nn.unstack_blocks(params)`; a decoding loop puts the
    params in `nn.decoding_layout` once, before it starts.
    """
    params = nn.unstack_blocks(params)
    positions = start[:, None] + jnp.arange(tokens.shape[1])  # (B, S)
    x = nn.embedding(params["tok_emb"], tokens) + nn.embedding(params["pos_emb"], positions)
    new_cache = []
    for layer_params, layer_cache in zip(params["trf_blocks"], cache, strict=True):
        x, layer_cache = block_cached(layer_params, x, cfg, layer_cache, positions)
        new_cache.append(layer_cache)  # (keys, values), (B, H, T_max, Dh) each
    return final_norm(params, x, cfg), tuple(new_cache)
