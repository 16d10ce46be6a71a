"""The Llama family (the book's bonus: converting GPT to Llama): the GPT with four changes.

Each change is one short function beside its GPT counterpart:
- `rms_norm` for layer norm: scale by the root mean square, no mean, no shift;
- `feed_forward` is SwiGLU: a SiLU-gated product of two projections for GELU's one;
- `rope`: positions rotate queries and keys (no positional embedding table), so attention scores
  depend only on how far apart two tokens are;
- `attend` is grouped-query attention: `n_kv_heads` key/value heads, each shared by
  n_heads / n_kv_heads query heads, so the KV cache holds only those.
No biases and no dropout. With `tie_embeddings` the params have no `out_head`: the head is the
token embedding. Params keep the GPT's names and stacking (`trf_blocks`, `att`, `ff`, `norm1`...).
The compute dtype is the params' dtype (cast them to bfloat16 for bf16).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gptflax import nn
from gptflax.attention import causal_mask, merge_heads, split_heads, write_cache
from gptflax.config import LlamaConfig

# The logical axes of the params, by path, for `gptflax.parallel` (as `gpt.LOGICAL_AXES`).
LOGICAL_AXES = {
    "tok_emb/embedding": ("vocab", "embed"),
    "W_query/kernel": ("embed", "heads"),  # (D, H * Dh)
    "W_key/kernel": ("embed", "kv_heads"),  # (D, G * Dh)
    "W_value/kernel": ("embed", "kv_heads"),
    "out_proj/kernel": ("heads", "embed"),
    "fc1/kernel": ("embed", "mlp"),  # (D, hidden)
    "fc2/kernel": ("embed", "mlp"),
    "fc3/kernel": ("mlp", "embed"),
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


def feed_forward(params: dict, x: jax.Array) -> jax.Array:
    """fc3(silu(fc1(x)) * fc2(x)): (B, T, D) -> (B, T, D); SiLU(x) = x * sigmoid(x)."""
    gate = jax.nn.silu(nn.linear(params["fc1"], x))  # (B, T, hidden)
    return nn.linear(params["fc3"], gate * nn.linear(params["fc2"], x))


# --- Rotary position embeddings ------------------------------------------------------------------


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
    """The rotation speed of each of the head_dim / 2 pairs: base^(-2i / head_dim), (Dh/2,).

    With Llama 3's `rope_scaling`, pairs that turn slower than once per original_context_length
    / low_freq_factor tokens turn `factor` times slower still, pairs faster than once per
    original_context_length / high_freq_factor keep their speed, and those between blend."""
    dh = cfg.head_dim
    inv_freq = cfg.rope_base ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    if (s := cfg.rope_scaling) is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    blend = (s.original_context_length / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blend = jnp.clip(blend, 0.0, 1.0)  # 0: slow pair, scaled; 1: fast pair, kept
    return (1 - blend) * inv_freq / s.factor + blend * inv_freq


def rope_angles(positions: jax.Array, cfg: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position * frequency, each (..., Dh): pair i uses columns i and i + Dh/2."""
    angles = positions[..., None].astype(jnp.float32) * rope_frequencies(cfg)  # (..., Dh/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (..., Dh)
    return jnp.cos(angles), jnp.sin(angles)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate each pair (x[i], x[i + Dh/2]) of every head by its angle: x (B, H, T, Dh), cos and
    sin (B or 1, T, Dh). Hugging Face's convention (halves, not neighbours, form the pairs)."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)  # (B, H, T, Dh)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return (x * cos + rotated * sin).astype(x.dtype)


# --- Grouped-query attention ---------------------------------------------------------------------


def init_attention(key: jax.Array, cfg: LlamaConfig) -> dict:
    """Queries for n_heads, keys and values for n_kv_heads only, and the output projection."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    d, kv_dim = cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim
    return {
        "W_query": nn.init_linear(kq, d, d, bias=False),
        "W_key": nn.init_linear(kk, d, kv_dim, bias=False),
        "W_value": nn.init_linear(kv, d, kv_dim, bias=False),
        "out_proj": nn.init_linear(ko, d, d, bias=False),
    }


def project_qkv(params: dict, x: jax.Array, cos, sin, cfg: LlamaConfig) -> tuple:
    """Queries (B, H, T, Dh) and keys (B, G, T, Dh), both rotated, and values (B, G, T, Dh)."""
    q = split_heads(nn.linear(params["W_query"], x), cfg.n_heads)
    k = split_heads(nn.linear(params["W_key"], x), cfg.n_kv_heads)
    v = split_heads(nn.linear(params["W_value"], x), cfg.n_kv_heads)
    return rope(q, cos, sin), rope(k, cos, sin), v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Grouped-query attention: q (B, H, S, Dh) over k, v (B, G, T, Dh), where query head h reads
    key/value head h // (H / G); visible (B or 1, S, T) says which keys each query may see.
    The softmax runs in float32. Returns (B, S, H * Dh)."""
    b, h, s, dh = q.shape
    g = k.shape[1]
    q = q.reshape(b, g, h // g, s, dh)  # (B, G, R, S, Dh): R query heads per key/value head
    scores = jnp.einsum("bgrsd,bgtd->bgrst", q, k).astype(jnp.float32) / math.sqrt(dh)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)  # (B, G, R, S, T)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    context = jnp.einsum("bgrst,bgtd->bgrsd", weights, v)  # (B, G, R, S, Dh)
    return merge_heads(context.reshape(b, h, s, dh))


# --- The model, with the GPT family's interface --------------------------------------------------


def init_block(key: jax.Array, cfg: LlamaConfig) -> dict:
    k_att, k_ff = jax.random.split(key)
    return {
        "att": init_attention(k_att, cfg),
        "ff": init_feed_forward(k_ff, cfg.emb_dim, cfg.hidden_dim),
        "norm1": init_rms_norm(cfg.emb_dim),
        "norm2": init_rms_norm(cfg.emb_dim),
    }


def init_params(key: jax.Array, cfg: LlamaConfig) -> dict:
    """Fresh Llama params, blocks stacked along a leading n_layers axis; embeddings N(0, 1)."""
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


def block(params: dict, x: jax.Array, cos, sin, visible, cfg: LlamaConfig, cache=None, slots=None):
    """A pre-norm Llama block: (B, S, D) -> (B, S, D). With a layer's (keys, values) cache, the
    new keys and values go into their `slots` (B, S) first; returns (x, cache)."""
    with jax.named_scope("attention"):
        q, k, v = project_qkv(
            params["att"], rms_norm(params["norm1"], x, cfg.rms_eps), cos, sin, cfg
        )
        if cache is not None:
            k, v = cache = write_cache(cache, k, v, slots)
        x = x + nn.linear(params["att"]["out_proj"], attend(q, k, v, visible))
    with jax.named_scope("feed_forward"):
        return x + feed_forward(params["ff"], rms_norm(params["norm2"], x, cfg.rms_eps)), cache


def embed(params: dict, tokens: jax.Array, cfg: LlamaConfig, *, key=None) -> jax.Array:
    """Token embeddings only (positions enter as rotations): (B, T) -> (B, T, D). No dropout."""
    if tokens.shape[-1] > cfg.context_length:
        raise ValueError(
            f"{tokens.shape[-1]} tokens exceed the context length of {cfg.context_length}: "
            "keep only the last context_length tokens (e.g. tokens[:, -context_length:])"
        )
    with jax.named_scope("embed"):
        return nn.embedding(params["tok_emb"], tokens)


def run_blocks(blocks: dict, x: jax.Array, cfg: LlamaConfig, *, key=None) -> jax.Array:
    """Stacked blocks over positions 0..T-1, in order (`nn.scan_layers`): (B, T, D) -> (B, T, D)."""
    t = x.shape[1]
    cos, sin = rope_angles(jnp.arange(t)[None], cfg)  # (1, T, Dh)
    visible = causal_mask(t)[None]  # (1, T, T)

    def step(x, layer_params):
        with jax.named_scope("block"):
            return block(layer_params, x, cos, sin, visible, cfg)[0], None

    return nn.scan_layers(step, x, blocks)


def final_norm(params: dict, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """The RMSNorm after the last block: (B, T, D) -> (B, T, D)."""
    with jax.named_scope("final_norm"):
        return rms_norm(params["final_norm"], x, cfg.rms_eps)


def head(params: dict, h: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, V) logits: `out_head`, or the token embedding when the two are tied."""
    with jax.named_scope("head"):
        tied = {"kernel_t": params["tok_emb"]["embedding"]}  # (V, D): the kernel, transposed
        return nn.linear(params.get("out_head", tied), h)


def hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, *, key=None) -> jax.Array:
    """(B, T) ids -> (B, T, D) final hidden states, what the output head reads."""
    return final_norm(
        params, run_blocks(params["trf_blocks"], embed(params, tokens, cfg), cfg), cfg
    )


def forward(params: dict, tokens: jax.Array, cfg: LlamaConfig, *, key=None) -> jax.Array:
    """The Llama model: (B, T) ids -> (B, T, V) logits."""
    return head(params, hidden(params, tokens, cfg))


def init_cache(cfg: LlamaConfig, batch_size: int, length: int, dtype=jnp.float32) -> tuple:
    """An empty KV cache of `length` positions, key/value heads only: one (keys, values) pair per
    layer, (B, G, length, Dh) each."""
    shape = (batch_size, cfg.n_kv_heads, length, cfg.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers))


def hidden_cached(
    params: dict, tokens: jax.Array, cache: tuple, start: jax.Array, cfg: LlamaConfig
) -> tuple[jax.Array, tuple]:
    """Eval-mode `hidden` for new tokens at positions start[b], start[b] + 1, ... of row b, with
    earlier positions' keys and values from `cache`: (B, S) -> (B, S, D) and the cache."""
    params = nn.unstack_blocks(params)
    positions = start[:, None] + jnp.arange(tokens.shape[1])  # (B, S)
    cos, sin = rope_angles(positions, cfg)  # (B, S, Dh)
    visible = jnp.arange(cache[0][0].shape[2]) <= positions[..., None]  # (B, S, T_cache)
    x, new_cache = embed(params, tokens, cfg), []
    for layer_params, layer_cache in zip(params["trf_blocks"], cache, strict=True):
        x, layer_cache = block(layer_params, x, cos, sin, visible, cfg, layer_cache, positions)
        new_cache.append(layer_cache)
    return final_norm(params, x, cfg), tuple(new_cache)
