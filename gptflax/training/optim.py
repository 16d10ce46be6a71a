"""The optimizer (Book §5.2) and appendix D's learning-rate schedule and gradient clipping."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "muon")


def check_optimizer(optimizer: str) -> None:
    """A ValueError naming the optimizers, for one that is none of them."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")


def make_optimizer(
    learning_rate: float | optax.Schedule = 4e-4,
    weight_decay: float = 0.1,
    *,
    max_grad_norm: float | None = None,
    clip_from_step: int = 0,
    optimizer: str = "adamw",
) -> optax.GradientTransformation:
    """AdamW with torch's defaults (b1 0.9, b2 0.999, eps 1e-8), decay on every parameter as the
    book does; optionally gradient clipping to `max_grad_norm` from step `clip_from_step` (App. D).
    `optimizer="muon"` is optax's Muon for the blocks' weight matrices (`muon_matrices`) and
    AdamW as above, with Nesterov momentum as optax's Muon has it, for the rest (the book's
    bonus ch05/18)."""
    check_optimizer(optimizer)
    if optimizer == "adamw":
        tx = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    else:
        tx = optax.contrib.muon(
            learning_rate, weight_decay=weight_decay, adam_b1=0.9, adam_b2=0.999,
            adam_weight_decay=weight_decay, muon_weight_dimension_numbers=muon_matrices,
        )  # fmt: skip
    if max_grad_norm is None:
        return tx
    return optax.chain(clip_by_global_norm_from(clip_from_step, max_grad_norm), tx)


def muon_matrices(params: dict) -> dict:
    """Which params Muon orthogonalises: the transformer blocks' kernels, (layers, d_in, d_out)
    stacked (or (d_in, d_out) when listed), each layer's matrix on its own; None (AdamW) for
    embeddings, norms, biases and the output head, as Muon's authors advise."""

    def dims(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if "trf_blocks" in names and names[-1] == "kernel" and leaf.ndim >= 2:
            return optax.contrib.MuonDimensionNumbers(
                reduction_axis=leaf.ndim - 2, output_axis=leaf.ndim - 1
            )
        return None

    return jax.tree_util.tree_map_with_path(dims, params)


def warmup_cosine_schedule(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    initial_lr: float = 3e-5,
    min_lr: float = 1e-6,
) -> optax.Schedule:
    """Linear warmup from initial_lr to peak_lr, then cosine decay to min_lr (App. D.1-D.2)."""
    warmup = optax.linear_schedule(initial_lr, peak_lr, warmup_steps)
    decay = optax.cosine_decay_schedule(peak_lr, total_steps - warmup_steps, alpha=min_lr / peak_lr)
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


class ClipFromState(NamedTuple):
    count: jax.Array


def clip_by_global_norm_from(start_step: int, max_norm: float) -> optax.GradientTransformation:
    """Clip the gradients' global norm to max_norm at every step >= start_step (App. D.3).

    The book clipped from the step after warmup_steps; its errata clips from warmup_steps itself.
    """
    clip = optax.clip_by_global_norm(max_norm)

    def init(params):
        return ClipFromState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        clipped, _ = clip.update(updates, clip.init(updates))
        on = state.count >= start_step
        updates = jax.tree.map(lambda c, u: jnp.where(on, c, u), clipped, updates)
        return updates, ClipFromState(count=state.count + 1)

    return optax.GradientTransformation(init, update)
