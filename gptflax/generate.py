"""Text generation (Book §4.7).

Under `jax.jit` every new input shape compiles anew, so the naive loop, whose input grows by one
token a step, would compile once per token. Here the tokens sit in a window whose width is rounded
up to a power of two (at most the context length), so a whole run compiles only a few times.
Causal attention makes the padding harmless: position t never sees positions after it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gptflax.config import GPTConfig
from gptflax.model import forward

MIN_WINDOW = 8


def window_width(num_tokens: int, context_size: int) -> int:
    """The padded width for `num_tokens`: the next power of two >= 8, capped at context_size."""
    return min(max(MIN_WINDOW, 1 << (num_tokens - 1).bit_length()), context_size)


@partial(jax.jit, static_argnames="cfg")
def next_token_logits(
    params: dict, window: jax.Array, length: jax.Array, cfg: GPTConfig
) -> jax.Array:
    """Logits for the token after the first `length` tokens of each row: (B, W) -> (B, V)."""
    logits = forward(params, window, cfg)  # (B, W, V)
    return jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)


def padded_window(idx: np.ndarray, context_size: int) -> tuple[np.ndarray, int]:
    """The last `context_size` tokens of idx (B, T), left-aligned in a zero-padded window."""
    idx_cond = idx[:, -context_size:]
    num_tokens = idx_cond.shape[1]
    window = np.zeros((idx.shape[0], window_width(num_tokens, context_size)), dtype=np.int32)
    window[:, :num_tokens] = idx_cond
    return window, num_tokens


def generate_text_simple(
    params: dict, idx, max_new_tokens: int, context_size: int, cfg: GPTConfig
) -> np.ndarray:
    """Greedy decoding: append the most likely next token, max_new_tokens times (Book §4.7).

    idx: (B, T) token ids -> (B, T + max_new_tokens).
    """
    idx = np.asarray(idx, dtype=np.int32)
    for _ in range(max_new_tokens):
        window, num_tokens = padded_window(idx, context_size)
        logits = next_token_logits(params, jnp.asarray(window), num_tokens, cfg)  # (B, V)
        idx_next = np.asarray(jnp.argmax(logits, axis=-1))[:, None]  # (B, 1)
        idx = np.concatenate([idx, idx_next.astype(np.int32)], axis=1)
    return idx
