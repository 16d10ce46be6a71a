"""The losses (Book §5.1, §6.6, §7.3): next-token cross-entropy with an ignore index, the
classification loss and the class logits it reads, perplexity, and a wrapper that computes any
of them in bfloat16. They take any model family's params and config."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

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
    loss_chunk: int | None = None,
    pad_vocab: int = 1,
) -> jax.Array:
    """Loss of one batch: (B, T) inputs and targets -> scalar (the book's calc_loss_batch, §5.1).

    Two ways to compute the same number faster (the speed lab): `pad_vocab` rounds the head's
    vocabulary up to a multiple (GPT-2's 50,257 -> 50,304 at 128) for the matmul, the padding's
    logits masked out; `loss_chunk` runs the head and the loss `loss_chunk` positions at a time
    (`head_cross_entropy`), never holding the (B, T, V) float32 logits."""
    if loss_chunk is None and pad_vocab == 1:
        logits = models.forward(params, inputs, cfg, key=key)
        with jax.named_scope("loss"):
            return cross_entropy(logits, targets)
    h = models.hidden(params, inputs, cfg, key=key)  # (B, T, D)
    with jax.named_scope("head"):
        return head_cross_entropy(h, models.head_kernel(params), targets, loss_chunk, pad_vocab)


def head_cross_entropy(
    h: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    chunk: int | None = None,
    pad_vocab: int = 1,
) -> jax.Array:
    """`cross_entropy(h @ kernel, targets)` for hidden states h (..., D), a head kernel (D, V) and
    targets (...), with the vocabulary padded to a multiple of `pad_vocab` (the padding's logits
    masked to -inf, so it is never predicted and gets no gradient) and, with `chunk`, fused with
    the head: `chunk` positions at a time, each chunk's gradients computed in the forward pass,
    so that at most (chunk, V) logits exist and nothing is recomputed in the backward."""
    vocab = kernel.shape[1]
    padded = -(-vocab // pad_vocab) * pad_vocab
    kernel = jnp.pad(kernel, ((0, 0), (0, padded - vocab)))  # (D, V') with zero columns
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # (N, D), (N,)
    if chunk is None:
        return cross_entropy(_masked_logits(h @ kernel, vocab), targets)
    rows = -(-h.shape[0] // chunk) * chunk  # whole chunks: the extra rows' targets are ignored
    h = jnp.pad(h, ((0, rows - h.shape[0]), (0, 0)))
    targets = jnp.pad(targets, (0, rows - targets.shape[0]), constant_values=IGNORE_INDEX)
    return _fused_cross_entropy(h, kernel, targets, chunk, vocab)


def _masked_logits(logits: jax.Array, vocab: int) -> jax.Array:
    """Float32 logits (N, V') with the columns from `vocab` on (the padding) at -inf."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] == vocab:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)


def _chunked_loss_and_grads(h, kernel, targets, chunk: int, vocab: int, with_grads: bool):
    """The mean cross-entropy of `h @ kernel` over valid targets, computed `chunk` rows at a
    time, and, with_grads, its gradients with respect to h (N, D) and the kernel (D, V')."""
    valid = targets != IGNORE_INDEX
    count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    h_chunks = h.reshape(-1, chunk, h.shape[-1])  # (N / C, C, D)
    t_chunks = targets.reshape(-1, chunk)  # (N / C, C)

    def one_chunk(d_kernel, xs):
        h_c, t_c = xs  # (C, D), (C,)
        logits = _masked_logits(h_c @ kernel, vocab)  # (C, V'): the only logits held
        ok = t_c != IGNORE_INDEX
        lse = jax.nn.logsumexp(logits, axis=-1)  # (C,)
        picked = jnp.take_along_axis(logits, jnp.where(ok, t_c, 0)[:, None], axis=-1)[:, 0]
        loss_sum = jnp.sum(jnp.where(ok, lse - picked, 0.0))
        if not with_grads:
            return d_kernel, (loss_sum, None)
        # d(mean loss)/d logits = (softmax - one_hot(target)) / count, on valid rows only
        probs = jnp.exp(logits - lse[:, None])
        d_logits = probs - jax.nn.one_hot(jnp.where(ok, t_c, -1), logits.shape[-1])
        d_logits = (jnp.where(ok[:, None], d_logits, 0.0) / count).astype(kernel.dtype)
        d_h = jnp.dot(d_logits, kernel.T, preferred_element_type=jnp.float32)  # (C, D)
        d_kernel = d_kernel + jnp.dot(h_c.T, d_logits, preferred_element_type=jnp.float32)
        return d_kernel, (loss_sum, d_h.astype(h.dtype))

    d_kernel0 = jnp.zeros(kernel.shape, jnp.float32) if with_grads else None
    d_kernel, (sums, d_h) = jax.lax.scan(one_chunk, d_kernel0, (h_chunks, t_chunks))
    loss = sums.sum() / count
    if not with_grads:
        return loss, None
    return loss, (d_h.reshape(h.shape), d_kernel.astype(kernel.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_cross_entropy(h, kernel, targets, chunk: int, vocab: int) -> jax.Array:
    return _chunked_loss_and_grads(h, kernel, targets, chunk, vocab, with_grads=False)[0]


def _fused_forward(h, kernel, targets, chunk, vocab):
    return _chunked_loss_and_grads(h, kernel, targets, chunk, vocab, with_grads=True)


def _fused_backward(chunk, vocab, grads, g):
    d_h, d_kernel = grads
    return (g * d_h).astype(d_h.dtype), (g * d_kernel).astype(d_kernel.dtype), None


_fused_cross_entropy.defvjp(_fused_forward, _fused_backward)


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
