"""Classification fine-tuning (Book ch. 6): a new output head, a mostly frozen body, and the
prediction read from the last token (or the last real token, before the padding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gptflax import nn
from gptflax.config import GPTConfig
from gptflax.model import forward
from gptflax.train import cross_entropy


def replace_out_head(params: dict, key: jax.Array, num_classes: int = 2) -> dict:
    """Swap the (D, vocab) output layer for a fresh (D, num_classes) one with a bias (§6.5)."""
    emb_dim = params["out_head"]["kernel"].shape[0]
    return {**params, "out_head": nn.init_linear(key, emb_dim, num_classes)}


def trainable_mask(params: dict, n_last_blocks: int = 1) -> dict:
    """1 where a parameter trains, 0 where it is frozen: the last n blocks, the final norm and the
    head, as the book's requires_grad settings (§6.5). Block leaves are stacked, so their mask is
    per layer: shape (n_layers, 1, ..., 1)."""

    def block_mask(leaf):
        n_layers = leaf.shape[0]
        on = jnp.arange(n_layers) >= n_layers - n_last_blocks
        return on.reshape((n_layers,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)

    mask = jax.tree.map(lambda leaf: jnp.zeros((), leaf.dtype), params)
    mask["trf_blocks"] = jax.tree.map(block_mask, params["trf_blocks"])
    for name in ("final_norm", "out_head"):
        mask[name] = jax.tree.map(lambda leaf: jnp.ones((), leaf.dtype), params[name])
    return mask


def count_trainable(params: dict, mask: dict) -> int:
    """How many scalars the mask lets train."""
    counts = jax.tree.map(lambda p, m: int(jnp.broadcast_to(m, p.shape).sum()), params, mask)
    return sum(jax.tree.leaves(counts))


def freeze(mask: dict) -> optax.GradientTransformation:
    """Zero the updates of frozen parameters; chain it after the optimizer, so that weight decay
    cannot move them either (torch skips parameters without gradients entirely)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * m, updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def classification_logits(
    params: dict,
    tokens: jax.Array,
    cfg: GPTConfig,
    *,
    key: jax.Array | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Class logits (B, C) read at the last position (the book, §6.6), or, with pad_token_id, at
    each row's last token before its right padding."""
    logits = forward(params, tokens, cfg, key=key)  # (B, T, C)
    if pad_token_id is None:
        return logits[:, -1, :]
    last = jnp.maximum((tokens != pad_token_id).sum(axis=1) - 1, 0)  # (B,)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, :]


def classification_loss(params, tokens, labels, cfg, *, key=None, pad_token_id=None) -> jax.Array:
    """Cross-entropy of the class logits against (B,) labels (Book §6.6's calc_loss_batch)."""
    logits = classification_logits(params, tokens, cfg, key=key, pad_token_id=pad_token_id)
    return cross_entropy(logits, labels)


def accuracy(params, tokens, labels, cfg, *, pad_token_id=None) -> jax.Array:
    """Share of (B,) labels predicted right, in eval mode (Book §6.6's calc_accuracy_loader)."""
    logits = classification_logits(params, tokens, cfg, pad_token_id=pad_token_id)
    return (logits.argmax(axis=-1) == labels).mean()
