"""The jit-compiled train step (Book §5.2) and the losses of a loader's batches (Book §5.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptflax.data import DataLoader


class TrainState(NamedTuple):
    step: jax.Array  # optimizer steps taken (int32 scalar)
    params: dict
    opt_state: optax.OptState


def init_train_state(params: dict, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))


def train_step(
    state: TrainState,
    batch: tuple,
    key: jax.Array,
    *,
    loss: Callable,
    tx,
    has_aux: bool = False,
    accum_steps: int = 1,
) -> tuple[TrainState, dict]:
    """One optimizer step: `loss(params, *batch, key=k)` differentiated w.r.t. the params, with
    dropout drawing from k = fold_in(key, step) (Book §5.2). For pretraining, batch is the (B, T)
    inputs and targets and loss is `partial(loss_fn, cfg=cfg)`. With has_aux, loss returns
    (value, dict of metrics), and the metrics join the returned {"loss": value}.

    With `accum_steps`, the batch's rows go through the model in that many micro-batches, one
    after another, and their gradients are averaged (gradient accumulation): in a fraction of the
    memory, the same step as the whole batch at once when every micro-batch has as many targets
    (pretraining's windows; with ignored targets, a micro-batch's mean weighs as much as any)."""
    dropout_key = jax.random.fold_in(key, state.step)
    grad_fn = jax.value_and_grad(loss, has_aux=has_aux)
    if accum_steps == 1:
        value, grads = grad_fn(state.params, *batch, key=dropout_key)
    else:
        value, grads = _accumulated(grad_fn, state.params, batch, dropout_key, accum_steps)
    value, aux = value if has_aux else (value, {})
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"loss": value, **aux}


def _accumulated(grad_fn: Callable, params: dict, batch: tuple, key: jax.Array, n: int):
    """The mean of grad_fn's (value, grads) over n micro-batches of the batch's rows, in a scan;
    micro-batch i draws its dropout from fold_in(key, i)."""
    rows = batch[0].shape[0]
    if rows % n:
        raise ValueError(f"a batch of {rows} rows does not split into {n} equal micro-batches")
    micro = jax.tree.map(lambda x: x.reshape(n, rows // n, *x.shape[1:]), batch)  # (n, B/n, ...)

    def add_one(total, xs):
        i, micro_batch = xs
        value_grads = grad_fn(params, *micro_batch, key=jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, total, value_grads), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, *first, key=key))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    total, _ = jax.lax.scan(add_one, zeros, (jnp.arange(n), micro))
    return jax.tree.map(lambda t, s: (t / n).astype(s.dtype), total, shapes)


def calc_metrics_loader(
    metrics_of_batch: Callable, loader: DataLoader, num_batches: int | None = None
) -> dict:
    """Means of `metrics_of_batch(x, y)`'s dict of scalars over the first num_batches batches of
    the loader's epoch-0 order."""
    if len(loader) == 0:
        return {"loss": float("nan")}
    num_batches = len(loader) if num_batches is None else min(num_batches, len(loader))
    rows = [metrics_of_batch(x, y) for x, y, *_ in loader.batches(0, num_batches)]
    return {name: float(np.mean([float(r[name]) for r in rows])) for name in rows[0]}


def calc_loss_loader(
    loss_of_batch: Callable, loader: DataLoader, num_batches: int | None = None
) -> float:
    """Mean loss over the first num_batches batches of the loader's epoch-0 order (Book §5.1)."""
    metrics = calc_metrics_loader(lambda x, y: {"loss": loss_of_batch(x, y)}, loader, num_batches)
    return metrics["loss"]
