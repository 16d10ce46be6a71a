"""What every model family shares, written once: embed, the blocks in order, final norm, head
(Book §4.6's GPTModel.forward), and the same with a KV cache for decoding.

A family (`gptflax.models.registry`) provides its params, `embed`, `block`, `final_norm` and
logical axes; the functions here run them for any config. Every family's head is `out_head`, or
the token embedding when the model has none (tied). Without a cache, the stacked blocks run
in a `jax.lax.scan`, unrolled unless rematerialised on a CPU; with one, as a Python loop over
the layers, each with its own cache (`gptflax.attention.KVCache`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptflax import attention, nn
from gptflax.decoding import DecodingParams, check_trainable, params_dict
from gptflax.models.registry import family

# What each `cfg.remat` policy keeps from a block's forward pass for its backward pass.
REMAT_KEEPS = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
}


def check_context(num_tokens: int, cfg) -> None:
    """A clear error for more tokens than the model's context holds."""
    if num_tokens > cfg.context_length:
        raise ValueError(
            f"{num_tokens} tokens exceed the context length of {cfg.context_length}: "
            "keep only the last context_length tokens (e.g. tokens[:, -context_length:])"
        )


def run_blocks(
    blocks: dict,
    x: jax.Array,
    cfg,
    *,
    positions: jax.Array,
    key: jax.Array | None = None,
    first_layer: int = 0,
) -> jax.Array:
    """Run stacked transformer blocks in order: (B, T, D) -> (B, T, D). `first_layer` numbers
    the first of them (a model's later blocks run alone when its first ones are frozen).

    A `lax.scan` over the stacked layers, unrolled: rolled, each step slices its layer's weights
    out of the stack and stacks what the backward pass keeps, copies that cost more than the
    attention on a GPU (README) and 5-6% of a train step on a CPU (SmolLM2-135M and GPT-2
    124M), for a compile 2-3 times as long. Except with `cfg.remat` on a CPU: XLA's CPU backend
    drops the barrier that keeps an unrolled loop's recomputation apart, so it would merge the
    recomputed values back into the forward pass's and keep them all. With
    `cfg.remat`, each block is rematerialised (`jax.checkpoint`) by that policy. Listed blocks
    (layers of different kinds) run one after the other."""
    block = family(cfg).block
    n_layers = count_layers(blocks)
    layer_keys = jax.random.split(key, n_layers) if key is not None else None
    layers = range(first_layer, first_layer + n_layers)

    def step(x, layer):
        layer_params, layer_key, i, kv = layer
        with jax.named_scope("block"):
            return block(
                layer_params, x, cfg, layer=i, positions=positions, cache=kv, key=layer_key
            )

    if cfg.remat != "none":  # the backward pass recomputes what the policy does not keep
        step = jax.checkpoint(step, policy=REMAT_KEEPS[cfg.remat])
    if isinstance(blocks, list):  # layers of different kinds, one after the other
        shared = {}  # the keys and values of layers that later layers attend over
        for j, i in enumerate(layers):
            kv = shared.get(cfg.kv_source(i))
            if cfg.is_kv_source(i):  # its keys and values are kept, every position's
                kv = attention.init_kv_cache(x.shape[0], cfg.n_kv_heads, x.shape[1],
                                             cfg.head_dim, x.dtype)  # fmt: skip
            x, kv = step(x, (blocks[j], None if key is None else layer_keys[j], i, kv))
            shared[i] = kv
        return x
    unroll = cfg.remat == "none" or jax.default_backend() != "cpu"
    xs = (blocks, layer_keys, jnp.asarray(layers), None)
    return jax.lax.scan(step, x, xs, unroll=unroll)[0]


def count_layers(blocks) -> int:
    """How many layers `trf_blocks` holds, stacked or listed."""
    return len(blocks) if isinstance(blocks, list) else jax.tree.leaves(blocks)[0].shape[0]


def layer_slice(blocks, start: int, stop: int | None = None):
    """Layers start..stop of `trf_blocks`, stacked or listed as they were."""
    if isinstance(blocks, list):
        return blocks[start:stop]
    return jax.tree.map(lambda leaf: leaf[start:stop], blocks)


def head(params: dict | DecodingParams, h: jax.Array) -> jax.Array:
    """The output head: normed hidden states (B, T, D) -> (B, T, V) logits, through `out_head`,
    or the token embedding's transpose when the model has none (a tied head)."""
    params = params_dict(params)
    with jax.named_scope("head"):
        if "out_head" in params:
            return nn.linear(params["out_head"], h)
        return nn.linear({"kernel": params["tok_emb"]["embedding"].T}, h)


def head_kernel(params: dict) -> jax.Array:
    """The output head as one (D, V) matrix: `out_head`'s kernel, or the token embedding's
    transpose (a tied head), for losses that run the head themselves."""
    if "out_head" not in params:
        return params["tok_emb"]["embedding"].T
    out_head = params["out_head"]
    if set(out_head) != {"kernel"} or not isinstance(out_head["kernel"], jax.Array):
        raise ValueError(
            "this loss runs the head as one matrix: an output head with a bias or adapters "
            "(LoRA) needs the plain loss (no loss_chunk, pad_vocab=1)"
        )
    return out_head["kernel"]


def hidden(
    params: dict, tokens: jax.Array, cfg, *, key: jax.Array | None = None, frozen_blocks: int = 0
) -> jax.Array:
    """(B, T) ids -> (B, T, D) final hidden states, what the output head reads (Book §4.6); a
    `key` turns dropout on. No gradient flows back through the embeddings and the first
    `frozen_blocks` blocks, so that their backward pass is never computed (chapter 6's frozen
    layers)."""
    check_trainable(params)
    check_context(tokens.shape[-1], cfg)
    fam = family(cfg)
    k_emb, k_blocks = nn.split_key(key, 2)
    positions = jnp.arange(tokens.shape[-1])[None]  # (1, T)
    x = fam.embed(params, tokens, cfg, positions=positions, key=k_emb)  # (B, T, D)
    blocks = params["trf_blocks"]
    if frozen_blocks:
        k_frozen, k_blocks = nn.split_key(k_blocks, 2)
        first = layer_slice(blocks, 0, frozen_blocks)
        x = jax.lax.stop_gradient(run_blocks(first, x, cfg, positions=positions, key=k_frozen))
        blocks = layer_slice(blocks, frozen_blocks)
    x = run_blocks(blocks, x, cfg, positions=positions, key=k_blocks, first_layer=frozen_blocks)
    return fam.final_norm(params, x, cfg)


def forward(params: dict, tokens: jax.Array, cfg, *, key: jax.Array | None = None) -> jax.Array:
    """The model: (B, T) ids -> (B, T, V) logits; a `key` turns dropout on (Book §4.6)."""
    return head(params, hidden(params, tokens, cfg, key=key))


def init_layer_cache(cfg, layer: int, batch_size: int, length: int, dtype) -> attention.KVCache:
    """One layer's empty `KVCache`: `length` slots, or the layer's window when it keeps fewer (a
    ring)."""
    slots = min(length, cfg.cache_window(layer) or length)
    return attention.init_kv_cache(batch_size, cfg.n_kv_heads, slots, cfg.head_dim, dtype)


def init_cache(cfg, batch_size: int, length: int, dtype=jnp.float32) -> tuple:
    """An empty KV cache for decoding up to `length` positions, one per layer: the family's
    `init_layer_cache` where it has one (a layer that keeps something else), else a `KVCache`.
    Separate arrays per layer, so that a decoding step updates each in place."""
    init = getattr(family(cfg), "init_layer_cache", init_layer_cache)
    return tuple(init(cfg, i, batch_size, length, dtype) for i in range(cfg.n_layers))


def hidden_cached(
    params: dict | DecodingParams, tokens: jax.Array, cache: tuple, positions: jax.Array, cfg
) -> tuple[jax.Array, tuple]:
    """Eval-mode `hidden` for new tokens only: tokens (B, S) at `positions` (B, S), -1 for
    padding, which enters no cache; earlier positions' keys and values come from the cache
    (`init_cache`), which is returned updated. Prefill with the prompts at 0, 1, ..., then feed
    one token at a time: (B, S, D) final hidden states, for `head` where logits are needed.

    The params may be in the decoding layout (`gptflax.decoding`), as a decoding loop puts them
    once before it starts."""
    fam = family(cfg)
    params = params_dict(params)
    x = fam.embed(params, tokens, cfg, positions=positions)  # (B, S, D)
    new_cache = []
    for i, layer_cache in enumerate(cache):
        layer_params = _layer(params["trf_blocks"], i, x)
        source = cfg.kv_source(i)  # a KV-shared layer reads its source's updated cache
        x, updated = fam.block(
            layer_params, x, cfg, layer=i, positions=positions,
            cache=layer_cache if source == i else new_cache[source],
        )  # fmt: skip
        new_cache.append(updated if source == i else layer_cache)
    return fam.final_norm(params, x, cfg), tuple(new_cache)


def hidden_packed(
    params: dict | DecodingParams, tokens: jax.Array, positions: jax.Array, keep: jax.Array, cfg
) -> jax.Array:
    """Eval-mode `hidden` of packed rows: tokens (B, T) at `positions` (B, T), -1 for padding,
    each seeing the earlier tokens that `keep` (B, T, T) allows at positions not after its own.
    Several sequences share a row, or a tree of them: a context and the continuations that
    branch from it (`gptflax.evaluate`). -> (B, T, D) final hidden states. The families' plain
    softmax attention only (`gpt.plain_attention`)."""
    fam = family(cfg)
    params = params_dict(params)
    x = fam.embed(params, tokens, cfg, positions=positions)  # (B, T, D)
    for i in range(cfg.n_layers):
        layer_params = _layer(params["trf_blocks"], i, x)
        x, _ = fam.block(layer_params, x, cfg, layer=i, positions=positions, keep=keep)
    return fam.final_norm(params, x, cfg)


def _layer(blocks, i: int, x: jax.Array) -> dict:
    """Layer i's params from listed or stacked blocks, for input x. A stacked layer is sliced at an
    index that reads x (always i: min(i, i + isnan(x[0]))), so the slice cannot be taken before
    x reaches the layer. Sliced up front, as XLA's CPU does even across an optimization barrier,
    every layer's copy is alive at once: a second copy of the model (5 GB for a 1.5B one)."""
    if isinstance(blocks, list):
        return blocks[i]
    at = jnp.minimum(i, i + jnp.isnan(x.ravel()[0]).astype(jnp.int32))
    return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, at, 0, False), blocks)
