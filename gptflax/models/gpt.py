"""The GPT family (chapter 4): the model's pieces as pure functions over a params pytree.

Params use the book's names: `tok_emb`, `pos_emb`, `trf_blocks` (`att`, `ff`, `norm1`, `norm2`),
`final_norm`, `out_head`. The transformer blocks are stacked: every leaf under `trf_blocks` has a
leading axis of length `n_layers`. `gptflax.models.transformer` runs the pieces in order (Book
§4.6's forward), with and without a KV cache.

The book's attention alternatives (bonus ch04/04 to 07) are config fields, each off by default:
grouped-query attention (`n_kv_groups`), a sliding window (`window`, on all layers or all but every
`full_attention_every`-th; its cache a ring of the window's slots), multi-head latent attention
(`latent_dim`, `gptflax.models.mla`), a mixture of experts (`num_experts`,
`gptflax.models.moe`) and Gated DeltaNet linear attention (`gated_deltanet`,
`gptflax.models.deltanet`), KV sharing (`kv_shared_layers`: the last layers attend over an
earlier layer's keys and values) and DeepSeek sparse attention (`dsa_top_k`,
`gptflax.models.dsa`). A model whose layers differ in their params (DeltaNet and
attention, layers with and without their own keys and values) keeps its blocks as a list, each
layer's params its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptflax import nn
from gptflax.attention import attend, init_multi_head_attention, self_attention, split_heads
from gptflax.config import GPTConfig
from gptflax.models import deltanet, dsa, mla, moe, transformer

# The logical axes of the params, by path: what each dimension is, so that `gptflax.parallel` can
# split it over a device mesh for a sharding strategy. A bias follows its kernel's output axis;
# the stacked "trf_blocks" add a leading layer axis.
LOGICAL_AXES = {
    "tok_emb/embedding": ("vocab", "embed"),  # (V, D)
    "pos_emb/embedding": (None, "embed"),  # (context, D)
    "W_query/kernel": ("embed", "heads"),  # (D, H * Dh)
    "W_key/kernel": ("embed", "kv_heads"),  # (D, G * Dh)
    "W_value/kernel": ("embed", "kv_heads"),
    "out_proj/kernel": ("heads", "embed"),
    "fc1/kernel": ("embed", "mlp"),  # (D, 4D)
    "fc2/kernel": ("mlp", "embed"),
    "scale": ("embed",),  # layer norms
    "shift": ("embed",),
    "out_head/kernel": ("embed", "vocab"),  # (D, V), or (D, classes) after chapter 6
    **mla.LOGICAL_AXES,
    **moe.LOGICAL_AXES,
    **deltanet.LOGICAL_AXES,
    **dsa.LOGICAL_AXES,
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


def init_attention(key: jax.Array, cfg: GPTConfig, layer: int = 0) -> dict:
    """The attention's params: multi-head (Book §3.6.2), grouped-query, latent (MLA) or, on the
    layers that have it, Gated DeltaNet."""
    if cfg.is_deltanet(layer):
        return deltanet.init_layer(key, cfg)
    if cfg.kv_source(layer) != layer:  # queries only
        k_query, k_out = jax.random.split(key)
        return {
            "W_query": nn.init_linear(k_query, cfg.emb_dim, cfg.emb_dim, cfg.qkv_bias),
            "out_proj": nn.init_linear(k_out, cfg.emb_dim, cfg.emb_dim),
        }
    if cfg.latent_dim:
        return mla.init_attention(key, cfg)
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    params = init_multi_head_attention(key, cfg.emb_dim, cfg.emb_dim, cfg.qkv_bias, kv_dim)
    if cfg.dsa_top_k:
        params["indexer"] = dsa.init_indexer(jax.random.fold_in(key, 1), cfg)
    return params


def init_block(key: jax.Array, cfg: GPTConfig, layer: int = 0) -> dict:
    """Params of one transformer block (Book §4.5)."""
    k_att, k_ff = jax.random.split(key)
    return {
        "att": init_attention(k_att, cfg, layer),
        "ff": moe.init_feed_forward(k_ff, cfg)
        if cfg.num_experts
        else init_feed_forward(k_ff, cfg.emb_dim),
        "norm1": nn.init_layer_norm(cfg.emb_dim),
        "norm2": nn.init_layer_norm(cfg.emb_dim),
    }


def init_params(key: jax.Array, cfg: GPTConfig) -> dict:
    """Fresh GPT params with the blocks stacked along a leading n_layers axis (Book §4.6), or
    listed when the layers' params differ (DeltaNet beside attention, KV-shared layers)."""
    k_tok, k_pos, k_blocks, k_head = jax.random.split(key, 4)
    block_keys = jax.random.split(k_blocks, cfg.n_layers)
    if len({(cfg.is_deltanet(i), cfg.kv_source(i) != i) for i in range(cfg.n_layers)}) > 1:
        blocks = [init_block(k, cfg, i) for i, k in enumerate(block_keys)]
    else:
        blocks = jax.vmap(lambda k: init_block(k, cfg))(block_keys)
    return {
        "tok_emb": nn.init_embedding(k_tok, cfg.vocab_size, cfg.emb_dim),
        "pos_emb": nn.init_embedding(k_pos, cfg.context_length, cfg.emb_dim),
        "trf_blocks": blocks,
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


def init_layer_cache(cfg: GPTConfig, layer: int, batch_size: int, length: int, dtype):
    """A layer's empty cache: a DeltaNet state, MLA's latents, or keys and values
    (`transformer.init_layer_cache`); None for a layer that reads another's."""
    if cfg.kv_source(layer) != layer:
        return None
    if cfg.is_deltanet(layer):
        return deltanet.init_layer_cache(cfg, batch_size, dtype)
    if cfg.dsa_top_k:
        return dsa.init_layer_cache(cfg, batch_size, length, dtype)
    init = mla.init_layer_cache if cfg.latent_dim else transformer.init_layer_cache
    return init(cfg, layer, batch_size, length, dtype)


def layer_window(cfg: GPTConfig, layer):
    """The layer's sliding window, None where it sees everything; a traced layer (in the layer
    scan) of a model that mixes the two gets a traced window, one longer than any distance."""
    if not isinstance(layer, int) and cfg.window and cfg.full_attention_every:
        return jnp.where(cfg.is_full(layer), jnp.iinfo(jnp.int32).max, cfg.window)
    return cfg.kv_window(layer)


def plain_attention(cfg: GPTConfig) -> bool:
    """Whether every layer is softmax attention over its own keys and values (no DeltaNet, sparse,
    latent or shared-KV layers): what packed rows (`transformer.hidden_packed`) need."""
    return not (cfg.gated_deltanet or cfg.dsa_top_k or cfg.latent_dim or cfg.kv_shared_layers)


def attention(
    params: dict, x: jax.Array, cfg: GPTConfig, *, layer, positions, cache=None, key=None,
    keep=None,
) -> tuple[jax.Array, object]:  # fmt: skip
    """The block's attention, as the config chooses: (B, T, D) -> (B, T, D), and the updated
    cache. MLA runs as the book writes it in training, with its up-projections absorbed when it
    decodes from a cache. A block's params say whether it is a DeltaNet layer. `keep` (B, T, T)
    limits what each token sees (packed rows), in softmax attention only."""
    if keep is not None and not plain_attention(cfg):
        raise ValueError(
            "packed rows need plain softmax attention in every layer; this model has DeltaNet, "
            "sparse, latent or shared-KV layers: score it through the KV cache instead"
        )
    if "A_log" in params:
        return deltanet.gated_deltanet(params, x, cfg, positions=positions, cache=cache)
    if "indexer" in params:
        return dsa.sparse_attention(params, x, cfg, positions=positions, cache=cache, key=key)
    window = layer_window(cfg, layer)
    if cfg.kv_shared_layers and cfg.kv_source(layer) != layer:
        return shared_kv_attention(params, x, cfg, positions=positions, cache=cache,
                                   window=window, key=key), cache  # fmt: skip
    if cfg.latent_dim and cache is None:
        out = mla.plain(
            params, x, cfg, positions=positions, window=window, drop_rate=cfg.drop_rate, key=key
        )
        return out, None
    if cfg.latent_dim:
        return mla.absorbed(params, x, cfg, positions=positions, cache=cache, window=window)
    return self_attention(
        params, x, cfg.n_heads, positions=positions, cache=cache, drop_rate=cfg.drop_rate,
        key=key, fused=cfg.fused_attention, n_kv_heads=cfg.n_kv_heads, window=window, keep=keep,
    )  # fmt: skip


def shared_kv_attention(params, x, cfg: GPTConfig, *, positions, cache, window, key=None):
    """Attention of this layer's queries over another layer's keys and values, `cache` (all
    positions up to the queries'): (B, T, D) -> (B, T, D) (KV sharing)."""
    if cache is None:
        raise ValueError(
            "a KV-shared layer ran without its source layer's keys and values: run the blocks "
            "together (no frozen_blocks between a layer and the layers that share its keys)"
        )
    q = split_heads(nn.linear(params["W_query"], x), cfg.n_heads)  # (B, H, T, Dh)
    context = attend(
        q, cache.keys, cache.values, positions, cache.positions, window=window,
        drop_rate=cfg.drop_rate, key=key,
    )  # fmt: skip
    return nn.linear(params["out_proj"], context)


def block(
    params: dict,
    x: jax.Array,
    cfg: GPTConfig,
    *,
    layer,
    positions: jax.Array,
    cache=None,
    key: jax.Array | None = None,
    keep: jax.Array | None = None,
) -> tuple[jax.Array, object]:
    """Pre-norm transformer block with shortcut connections: (B, T, D) -> (B, T, D) (Book §4.5);
    with a layer cache, the attention reads earlier positions from it (returned updated). `keep`
    (B, T, T): which earlier tokens each token may see (packed rows; `attention`)."""
    k_att, k_drop1, k_drop2 = nn.split_key(key, 3)
    with jax.named_scope("attention"):
        shortcut = x
        x = nn.layer_norm(params["norm1"], x)
        x, cache = attention(
            params["att"], x, cfg, layer=layer, positions=positions, cache=cache, key=k_att,
            keep=keep,
        )  # fmt: skip
        x = nn.dropout(x, cfg.drop_rate, k_drop1) + shortcut
    with jax.named_scope("feed_forward"):
        shortcut = x
        x = nn.layer_norm(params["norm2"], x)
        if cfg.num_experts:
            x = moe.feed_forward(params["ff"], x, cfg)
        else:
            x = feed_forward(params["ff"], x)
        return nn.dropout(x, cfg.drop_rate, k_drop2) + shortcut, cache


def final_norm(params: dict, x: jax.Array, cfg: GPTConfig) -> jax.Array:
    """The layer norm after the last block: (B, T, D) -> (B, T, D)."""
    with jax.named_scope("final_norm"):
        return nn.layer_norm(params["final_norm"], x)
