"""Losses and training (Book ch. 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptflax.config import GPTConfig
from gptflax.model import forward

IGNORE_INDEX = -100


def cross_entropy(
    logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """Mean cross-entropy over targets != ignore_index: logits (..., V), targets (...) (Book §5.1).

    Like torch's `cross_entropy(..., ignore_index=-100)`: ignored targets add nothing and are not
    counted in the mean (Book §7.3).
    """
    valid = targets != ignore_index
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[
        ..., 0
    ]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(valid.sum(), 1)


def loss_fn(
    params: dict,
    inputs: jax.Array,
    targets: jax.Array,
    cfg: GPTConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Loss of one batch: (B, T) inputs and targets -> scalar (the book's calc_loss_batch, §5.1)."""
    return cross_entropy(forward(params, inputs, cfg, key=key), targets)
