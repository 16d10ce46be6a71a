"""The losses (Book §5.1, §6.6, §7.3): next-token cross-entropy with an ignore index, the
classification loss and the class logits it reads, perplexity, and a wrapper that computes any
of them in bfloat16. They take any model family's params and config."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gptflax import models

IGNORE_INDEX = -100


def cross_entropy(
    logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """Mean cross-entropy over targets != ignore_index: logits (..., V), targets (...) (Book §5.1).

    Like torch's `cross_entropy(..., ignore_index=-100)`: ignored targets add nothing and are not
    counted in the mean (Book §7.3).
    """
    logits = logits.astype(jnp.float32)
    valid = targets != ignore_index
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)
    # -log softmax(logits)[target] = logsumexp(logits) - logits[target]: never materialises the
    # (..., V) log-probabilities
    token_losses = jax.nn.logsumexp(logits, axis=-1) - picked[..., 0]
    return jnp.sum(jnp.where(valid, token_losses, 0.0)) / jnp.maximum(valid.sum(), 1)


def loss_fn(
    params: dict,
    inputs: jax.Array,
    targets: jax.Array,
    cfg,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Loss of one batch: (B, T) inputs and targets -> scalar (the book's calc_loss_batch, §5.1)."""
    logits = models.forward(params, inputs, cfg, key=key)
    with jax.named_scope("loss"):
        return cross_entropy(logits, targets)


def classifier_forward(
    params: dict,
    tokens: jax.Array,
    cfg,
    *,
    key: jax.Array | None = None,
    frozen_blocks: int = 0,
) -> jax.Array:
    """The model's forward with no gradient through the embeddings and the first
    `frozen_blocks` blocks, so that their backward pass is never computed: (B, T) -> (B, T, C)."""
    return models.head(
        params, models.hidden(params, tokens, cfg, key=key, frozen_blocks=frozen_blocks)
    )


def classification_logits(
    params: dict,
    tokens: jax.Array,
    cfg,
    *,
    key: jax.Array | None = None,
    pad_token_id: int | None = None,
    frozen_blocks: int = 0,
) -> jax.Array:
    """Class logits (B, C) read at the last position (the book, §6.6), or, with pad_token_id, at
    each row's last token before its right padding."""
    logits = classifier_forward(params, tokens, cfg, key=key, frozen_blocks=frozen_blocks)
    return read_class_logits(logits, tokens, pad_token_id)


def read_class_logits(
    logits: jax.Array, tokens: jax.Array, pad_token_id: int | None = None
) -> jax.Array:
    """The (B, C) class logits of (B, T, C) ones: at the last position, or, with pad_token_id, at
    each row's last token before its right padding."""
    if pad_token_id is None:
        return logits[:, -1, :]
    last = jnp.maximum((tokens != pad_token_id).sum(axis=1) - 1, 0)  # (B,)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, :]


def classification_loss(
    params, tokens, labels, cfg, *, key=None, pad_token_id=None, frozen_blocks=0
) -> jax.Array:
    """Cross-entropy of the class logits against (B,) labels (Book §6.6's calc_loss_batch)."""
    logits = classification_logits(
        params, tokens, cfg, key=key, pad_token_id=pad_token_id, frozen_blocks=frozen_blocks
    )
    return cross_entropy(logits, labels)


def mixed_precision(loss: Callable, dtype=jnp.bfloat16) -> Callable:
    """`loss` computed in `dtype` (bf16 matmuls) from float32 master weights: the params are cast
    on the way in, so their gradients come back in float32 for the optimizer. Layer-norm
    statistics, attention softmax and the loss itself stay in float32."""

    def loss_in_dtype(params, *batch, **kwargs):
        cast = jax.tree.map(
            lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
        )
        return loss(cast, *batch, **kwargs)

    return loss_in_dtype


def perplexity(loss: float) -> float:
    """exp(loss): the effective number of tokens the model hesitates between (Book §5.1.2)."""
    return math.exp(loss)
