"""Rotary position embeddings (RoPE), shared by Llama, Gemma 3 and Qwen: positions rotate the
queries and keys instead of adding a table, so an attention score depends only on how far apart
two tokens are (lab llama derives this from complex rotations).

Each head's Dh dimensions form Dh / 2 pairs, pair i = (x[i], x[i + Dh/2]) (Hugging Face's
"rotate half" convention), and pair i turns by position * base^(-2i / Dh).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gptflax.config import Llama3RoPE


def rope_frequencies(head_dim: int, base: float, scaling: Llama3RoPE | None = None) -> jax.Array:
    """The rotation speed of each of the head_dim / 2 pairs: base^(-2i / head_dim), (Dh/2,).

    With Llama 3's `scaling`, pairs that turn slower than once per original_context_length /
    low_freq_factor tokens turn `factor` times slower still, pairs faster than once per
    original_context_length / high_freq_factor keep their speed, and those between blend."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    blend = (scaling.original_context_length / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blend = jnp.clip(blend, 0.0, 1.0)  # 0: slow pair, scaled; 1: fast pair, kept
    return (1 - blend) * inv_freq / scaling.factor + blend * inv_freq


def rope_angles(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position * frequency, each (..., Dh): pair i uses columns i and i + Dh/2.
    Negative positions (padding) rotate as position 0."""
    angles = jnp.maximum(positions, 0)[..., None].astype(jnp.float32) * inv_freq  # (..., Dh/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (..., Dh)
    # Times the identity, exactly: a matmul's result is computed into memory once. Left as they
    # are, cos and sin are fused by XLA's CPU compiler into every op that reads them, and
    # recomputed for each head, query block and backward use: 3% of SmolLM2's train step.
    eye = jnp.eye(angles.shape[-1], dtype=jnp.float32)
    return tuple(jnp.matmul(f(angles), eye, precision="highest") for f in (jnp.cos, jnp.sin))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate each pair (x[i], x[i + Dh/2]) of every head by its angle: x (B, H, T, Dh), cos and
    sin (B or 1, T, Dh)."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)  # (B, H, T, Dh)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return (x * cos + rotated * sin).astype(x.dtype)
