"""What an architecture costs at inference: KV-cache bytes (per layer, in total at a context, per
token) and a mixture of experts' total and active parameters, as the book's estimators in the
bonus folders ch04/04_gqa to ch04/08_deltanet compute them.

The per-layer functions take the book's numbers; `kv_cache_bytes` adds them up over a config's
layers, each by its kind: full attention, a sliding window (SWA), a latent (MLA) or a Gated
DeltaNet's state. The book
prints GB as bytes / 1000**3.
"""

from __future__ import annotations

import math

import jax

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def kv_bytes_per_layer(
    context_length: int, n_kv_heads: int, head_dim: int, *, batch_size: int = 1, dtype_bytes=2
) -> int:
    """Keys and values of one attention layer: batch x context x n_kv_heads x head_dim x 2 (K, V)
    x bytes (Book ch04/04_gqa's `calc_kv_bytes_total`, per layer)."""
    return batch_size * context_length * n_kv_heads * head_dim * 2 * dtype_bytes


def mla_bytes_per_layer(
    context_length: int, latent_dim: int, *, batch_size: int = 1, dtype_bytes=2
) -> int:
    """One latent vector per token, for keys and values both (Book ch04/05_mla)."""
    return batch_size * context_length * latent_dim * dtype_bytes


def deltanet_bytes_per_layer(
    n_heads: int, head_dim: int, *, batch_size: int = 1, dtype_bytes=2
) -> int:
    """A Gated DeltaNet layer's state S, (Dh, Dh) per head, whatever the context (Book
    ch04/08_deltanet; no convolution state)."""
    return batch_size * n_heads * head_dim * head_dim * dtype_bytes


def swa_layers(n_layers: int, swa: int, full: int) -> tuple[int, int]:
    """(sliding, full) layer counts of an swa:full ratio, blocks of swa sliding layers then full
    ones, the remainder sliding first (Book ch04/06_swa's `distribute_layers`)."""
    blocks, rest = divmod(n_layers, swa + full)
    return blocks * swa + min(swa, rest), blocks * full + max(0, rest - swa)


def layer_cache_bytes(cfg, layer: int, context_length: int, *, batch_size=1, dtype_bytes=2) -> int:
    """The bytes one layer of `cfg` keeps for decoding at `context_length`: a Gated DeltaNet's
    state and its convolution's last inputs (which the book's plot leaves out), an MLA latent,
    or keys and values (and DSA's indexer keys), for the positions the layer keeps (its window,
    if it has one); nothing for a layer that reads another's (KV sharing)."""
    if cfg.kv_source(layer) != layer:
        return 0
    if cfg.is_deltanet(layer):
        state = deltanet_bytes_per_layer(
            cfg.n_heads, cfg.head_dim, batch_size=batch_size, dtype_bytes=dtype_bytes
        )
        conv = batch_size * (cfg.deltanet_conv - 1) * 3 * cfg.emb_dim * dtype_bytes
        return state + conv
    seen = min(context_length, cfg.cache_window(layer) or context_length)
    if getattr(cfg, "latent_dim", None):
        return mla_bytes_per_layer(
            seen, cfg.latent_dim, batch_size=batch_size, dtype_bytes=dtype_bytes
        )
    kv = kv_bytes_per_layer(
        seen, cfg.n_kv_heads, cfg.head_dim, batch_size=batch_size, dtype_bytes=dtype_bytes
    )
    if getattr(cfg, "dsa_top_k", None):  # and the indexer's key per position (GPT only)
        return kv + batch_size * seen * cfg.indexer_dim * dtype_bytes
    return kv


def kv_cache_bytes(cfg, context_length: int, *, batch_size: int = 1, dtype_bytes=2) -> int:
    """The whole KV cache (or recurrent state) of `cfg` for `context_length` tokens."""
    return sum(
        layer_cache_bytes(
            cfg, i, context_length, batch_size=batch_size, dtype_bytes=dtype_bytes
        )  # fmt: skip
        for i in range(cfg.n_layers)
    )


def kv_bytes_per_token(cfg, context_length: int, *, dtype_bytes=2) -> float:
    """The cache's bytes per token of context, at `context_length` (less than a full layer's per
    token where windows or states stop growing)."""
    return kv_cache_bytes(cfg, context_length, dtype_bytes=dtype_bytes) / context_length


def moe_params(
    emb_dim: int,
    hidden_dim: int,
    num_experts: int,
    top_k: int,
    *,
    swiglu: bool = True,
    match_dense: bool = False,
) -> dict[str, int]:
    """One feed-forward's parameters, dense and as a mixture of experts (Book ch04/07_moe's
    `memory_estimator_moe.py`): "dense", "per_expert", "router", "total", "active" (router plus
    top_k experts) and "moe_hidden_dim", the experts' hidden size; with `match_dense` it is shrunk
    so that all experts together hold about the dense layer's parameters."""
    matrices = 3 if swiglu else 2
    dense = matrices * emb_dim * hidden_dim
    router = emb_dim * num_experts
    moe_hidden = hidden_dim
    if match_dense:
        moe_hidden = round((dense - router) / (num_experts * matrices * emb_dim))
    per_expert = matrices * emb_dim * moe_hidden
    return {
        "dense": dense,
        "per_expert": per_expert,
        "router": router,
        "total": num_experts * per_expert + router,
        "active": router + top_k * per_expert,
        "moe_hidden_dim": moe_hidden,
    }


def param_counts(params: dict, cfg) -> tuple[int, int]:
    """(total, active) parameters of a model's params (or `jax.eval_shape`'s abstract ones): a
    token goes through num_experts_per_tok of each mixture's num_experts experts only."""
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    if not getattr(cfg, "num_experts", 0):
        return total, total
    experts = params["trf_blocks"]["ff"]["experts"]
    per_expert = sum(math.prod(leaf.shape[2:]) for leaf in jax.tree.leaves(experts))
    idle = cfg.n_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    return total, total - idle
