"""The Llama family (the book's bonus: converting GPT to Llama): the GPT with four changes.

Each change is one short function beside its GPT counterpart:
- `rms_norm` for layer norm: scale by the root mean square, no mean, no shift;
- `feed_forward` is SwiGLU: a SiLU-gated product of two projections for GELU's one;
- rotary positions (`gptflax.rope`) rotate queries and keys instead of a positional embedding
  table, so attention scores depend only on how far apart two tokens are;
- `attention` is grouped-query attention: `n_kv_heads` key/value heads, each shared by
  n_heads / n_kv_heads query heads, so the KV cache holds only those.
No biases and no dropout. With `tie_embeddings` the params have no `out_head`: the head is the
token embedding. Params keep the GPT's names and stacking (`trf_blocks`, `att`, `ff`, `norm1`...).
The compute dtype is the params' dtype (cast them to bfloat16 for bf16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptflax import nn
from gptflax.attention import attend, qkv, split_heads, with_cache
from gptflax.config import LlamaConfig
from gptflax.rope import apply_rope, rope_angles, rope_frequencies

# The logical axes of the params, by path, for `gptflax.parallel` (as the GPT family's).
LOGICAL_AXES = {
    "tok_emb/embedding": ("vocab", "embed"),
    "W_query/kernel": ("embed", "heads"),  # (D, H * Dh)
    "W_key/kernel": ("embed", "kv_heads"),  # (D, G * Dh)
    "W_value/kernel": ("embed", "kv_heads"),
    "out_proj/kernel": ("heads", "embed"),
    "fc1/kernel": ("embed", "mlp"),  # (D, hidden)
    "fc2/kernel": ("embed", "mlp"),
    "fc3/kernel": ("mlp", "embed"),
    "q_norm/scale": (None,),  # QK-norm (Gemma 3, Qwen3): over one head's Dh
    "k_norm/scale": (None,),
    "scale": ("embed",),  # RMSNorms
    "out_head/kernel": ("embed", "vocab"),
}

# --- RMSNorm: layer norm without the mean and the shift ------------------------------------------


def init_rms_norm(dim: int) -> dict:
    return {"scale": jnp.ones((dim,))}


def rms_norm(params: dict, x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, statistics in float32: (..., D)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return params["scale"] * normed.astype(x.dtype)


# --- SwiGLU: a gated feed-forward ----------------------------------------------------------------


def init_feed_forward(key: jax.Array, emb_dim: int, hidden_dim: int) -> dict:
    """fc1 (the gate) and fc2 (the value), D -> hidden; fc3, hidden -> D. No biases."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "fc1": nn.init_linear(k1, emb_dim, hidden_dim, bias=False),
        "fc2": nn.init_linear(k2, emb_dim, hidden_dim, bias=False),
        "fc3": nn.init_linear(k3, hidden_dim, emb_dim, bias=False),
    }


def feed_forward(params: dict, x: jax.Array, activation=jax.nn.silu) -> jax.Array:
    """fc3(silu(fc1(x)) * fc2(x)): (B, T, D) -> (B, T, D); SiLU(x) = x * sigmoid(x). Another
    `activation` gives another gated unit (GELU: Gemma's GeGLU). fc1 and fc2 in one matmul where
    the decoding layout joined them (`W_gate_value`, see `gptflax.decoding`)."""
    if "W_gate_value" in params:
        gate, value = params["W_gate_value"](x)  # (B, T, hidden) each
    else:
        gate, value = nn.linear(params["fc1"], x), nn.linear(params["fc2"], x)
    return nn.linear(params["fc3"], activation(gate) * value)


# --- Grouped-query attention with rotary positions ---------------------------------------------


def init_attention(key: jax.Array, cfg: LlamaConfig, qkv_bias: bool = False) -> dict:
    """Queries for n_heads, keys and values for n_kv_heads only, and the output projection."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    d, q_dim, kv_dim = cfg.emb_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {
        "W_query": nn.init_linear(kq, d, q_dim, bias=qkv_bias),
        "W_key": nn.init_linear(kk, d, kv_dim, bias=qkv_bias),
        "W_value": nn.init_linear(kv, d, kv_dim, bias=qkv_bias),
        "out_proj": nn.init_linear(ko, q_dim, d, bias=False),
    }


def attention(
    params: dict,
    x: jax.Array,
    cfg: LlamaConfig,
    *,
    positions: jax.Array,
    cache=None,
    inv_freq: jax.Array | None = None,
    window=None,
    scale: float | None = None,
    qk_norm=None,
    keep: jax.Array | None = None,
) -> tuple[jax.Array, object]:
    """Grouped-query attention of x (B, T, D) at `positions` (B or 1, T): queries (B, H, T, Dh),
    keys and values (B, G, T, Dh), queries and keys rotated by their positions (rotary speeds
    `inv_freq`, default the config's). Returns (B, T, D) and the layer's updated cache.

    The later families' changes are options: `qk_norm(params, q_or_k)` normalises each head's
    queries and keys before the rotation, `window` limits how far back a query sees, `scale`
    replaces 1/sqrt(Dh); biases are used when the params have them; `keep` (B, T, T) limits what
    each token sees further (packed rows)."""
    q, k, v = qkv(params, x)
    q = split_heads(q, cfg.n_heads)  # (B, H, T, Dh)
    k, v = (split_heads(y, cfg.n_kv_heads) for y in (k, v))  # (B, G, T, Dh)
    if qk_norm is not None:
        q, k = qk_norm(params["q_norm"], q), qk_norm(params["k_norm"], k)
    if inv_freq is None:
        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    cos, sin = rope_angles(positions, inv_freq)  # (B or 1, T, Dh)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v, k_pos, cache = with_cache(cache, k, v, positions, window)
    context = attend(
        q, k, v, positions, k_pos, window=window, scale=scale,
        causal=cache is None, fused=cfg.fused_attention, keep=keep,
    )  # (B, T, H * Dh)  # fmt: skip
    return nn.linear(params["out_proj"], context), cache


# --- The model's pieces, as the GPT family's -----------------------------------------------------


def init_block(key: jax.Array, cfg: LlamaConfig) -> dict:
    k_att, k_ff = jax.random.split(key)
    return {
        "att": init_attention(k_att, cfg),
        "ff": init_feed_forward(k_ff, cfg.emb_dim, cfg.hidden_dim),
        "norm1": init_rms_norm(cfg.emb_dim),
        "norm2": init_rms_norm(cfg.emb_dim),
    }


def init_params(key: jax.Array, cfg: LlamaConfig, init_block=init_block) -> dict:
    """Fresh params, blocks stacked along a leading n_layers axis; embeddings N(0, 1). The later
    families pass their own `init_block`."""
    k_tok, k_blocks, k_head = jax.random.split(key, 3)
    params = {
        "tok_emb": nn.init_embedding(k_tok, cfg.vocab_size, cfg.emb_dim),
        "trf_blocks": jax.vmap(lambda k: init_block(k, cfg))(
            jax.random.split(k_blocks, cfg.n_layers)
        ),
        "final_norm": init_rms_norm(cfg.emb_dim),
    }
    if not cfg.tie_embeddings:
        params["out_head"] = nn.init_linear(k_head, cfg.emb_dim, cfg.vocab_size, bias=False)
    return params


def embed(params: dict, tokens: jax.Array, cfg: LlamaConfig, *, positions, key=None) -> jax.Array:
    """Token embeddings only (positions enter as rotations): (B, T) -> (B, T, D). No dropout."""
    with jax.named_scope("embed"):
        return nn.embedding(params["tok_emb"], tokens)


def block(
    params: dict, x: jax.Array, cfg: LlamaConfig, *, layer, positions, cache=None, key=None,
    qk_norm=None, keep=None,
):  # fmt: skip
    """A pre-norm Llama block: (B, T, D) -> (B, T, D), and the layer's updated cache. (`qk_norm`
    is Qwen3's, `keep` a packed row's mask, see `attention`.)"""
    with jax.named_scope("attention"):
        normed = rms_norm(params["norm1"], x, cfg.rms_eps)
        att, cache = attention(
            params["att"], normed, cfg, positions=positions, cache=cache, qk_norm=qk_norm,
            keep=keep,
        )  # fmt: skip
        x = x + att
    with jax.named_scope("feed_forward"):
        return x + feed_forward(params["ff"], rms_norm(params["norm2"], x, cfg.rms_eps)), cache


def final_norm(params: dict, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """The RMSNorm after the last block: (B, T, D) -> (B, T, D)."""
    with jax.named_scope("final_norm"):
        return rms_norm(params["final_norm"], x, cfg.rms_eps)
