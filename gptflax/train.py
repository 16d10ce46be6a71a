"""The optimizer, the jit-compiled train step and the training loop (Book ch. 5, appendix D).

The losses they minimise are in `gptflax.losses`; `python -m gptflax train --help` trains on any
text file from the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gptflax import checkpoint, parallel
from gptflax.data import DataLoader
from gptflax.losses import loss_fn

# --- the optimizer (Book §5.2) and appendix D's schedule and clipping -----------------------------


def make_optimizer(
    learning_rate: float | optax.Schedule = 4e-4,
    weight_decay: float = 0.1,
    *,
    max_grad_norm: float | None = None,
    clip_from_step: int = 0,
) -> optax.GradientTransformation:
    """AdamW with torch's defaults (b1 0.9, b2 0.999, eps 1e-8), decay on every parameter as the
    book does; optionally gradient clipping to `max_grad_norm` from step `clip_from_step` (App. D).
    """
    adamw = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    if max_grad_norm is None:
        return adamw
    return optax.chain(clip_by_global_norm_from(clip_from_step, max_grad_norm), adamw)


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


# --- the train step -------------------------------------------------------------------------------


class TrainState(NamedTuple):
    step: jax.Array  # optimizer steps taken (int32 scalar)
    params: dict
    opt_state: optax.OptState


def init_train_state(params: dict, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))


def train_step(
    state: TrainState, batch: tuple, key: jax.Array, *, loss: Callable, tx, has_aux: bool = False
) -> tuple[TrainState, dict]:
    """One optimizer step: `loss(params, *batch, key=k)` differentiated w.r.t. the params, with
    dropout drawing from k = fold_in(key, step) (Book §5.2). For pretraining, batch is the (B, T)
    inputs and targets and loss is `partial(loss_fn, cfg=cfg)`. With has_aux, loss returns
    (value, dict of metrics), and the metrics join the returned {"loss": value}."""
    dropout_key = jax.random.fold_in(key, state.step)
    grad_fn = jax.value_and_grad(loss, has_aux=has_aux)
    value, grads = grad_fn(state.params, *batch, key=dropout_key)
    value, aux = value if has_aux else (value, {})
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"loss": value, **aux}


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


# --- the training loop ----------------------------------------------------------------------------


@dataclasses.dataclass
class History:
    """What `fit` records at every evaluation, and the samples it prints after each epoch."""

    steps: list[int] = dataclasses.field(default_factory=list)
    tokens_seen: list[int] = dataclasses.field(default_factory=list)
    train_losses: list[float] = dataclasses.field(default_factory=list)
    val_losses: list[float] = dataclasses.field(default_factory=list)
    examples_seen: list[int] = dataclasses.field(default_factory=list)
    samples: list[str] = dataclasses.field(default_factory=list)
    epoch_metrics: list[dict] = dataclasses.field(default_factory=list)
    train_metrics: list[dict] = dataclasses.field(default_factory=list)  # a has_aux loss's
    val_metrics: list[dict] = dataclasses.field(default_factory=list)
    epochs_done: int = 0
    total_tokens: int = 0
    total_examples: int = 0


def fit(
    state: TrainState,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg,
    tx: optax.GradientTransformation,
    *,
    num_epochs: int,
    key: jax.Array,
    eval_freq: int = 5,
    eval_iter: int = 5,
    loss: Callable | None = None,
    sample_fn: Callable[[dict], str] | None = None,
    epoch_metrics: Callable[[dict], dict] | None = None,
    checkpoint_dir: str | Path | None = None,
    history: History | None = None,
    meta: dict | None = None,
    mesh: Mesh | None = None,
    strategy: str = "dp",
    has_aux: bool = False,
) -> tuple[TrainState, History]:
    """Train for num_epochs, evaluating every eval_freq steps (Book §5.2's train_model_simple).

    `loss(params, *batch, key=None)` defaults to next-token cross-entropy; chapter 6 passes a
    classification loss. A `has_aux` loss returns (value, dict of scalars): the dict's means are
    recorded beside the losses (`history.train_metrics`, `val_metrics`). After each epoch,
    `sample_fn(params)` text and `epoch_metrics(params)` (e.g. accuracies, §6.7) are recorded.
    With `checkpoint_dir`, saves after every epoch (with the JSON record `meta`, if given).
    Ctrl-C raises KeyboardInterrupt before the next step (an epoch's end, its save included,
    completes first); a second Ctrl-C stops at once. Pass the state and history of `resume(...)`
    to continue an interrupted run: the result is the same as an uninterrupted run's.

    With a `mesh` (`parallel.make_mesh`), every batch is split over its "data" axis and the
    state placed as `strategy` says: "dp" (replicated), "fsdp", "tp" or "fsdp+tp" (see
    `gptflax.parallel`). In a multi-process run each process loads only its rows of each batch.
    The `state` passed in stays usable: fit copies it once, and each step then donates its own
    copy's buffers to the next.
    """
    history = history or History()
    loss = loss or partial(loss_fn, cfg=cfg)
    step_fn = partial(train_step, loss=loss, tx=tx, has_aux=has_aux)
    rows = None  # every row of each batch
    if mesh is None:
        state = jax.tree.map(jnp.copy, state)  # ours to donate; the caller's arrays stay valid
        step_fn = jax.jit(step_fn, donate_argnums=0)
    else:
        state, step_fn = parallel.jit_sharded(step_fn, state, cfg, mesh, strategy, donate_argnums=0)
        rows = parallel.local_rows(mesh, train_loader.batch_size)
    eval_fn = jax.jit(loss if has_aux else lambda *args: (loss(*args), {}))
    steps = num_epochs * len(train_loader)
    with (
        tqdm(total=steps, initial=int(state.step), unit="step", mininterval=1.0) as bar,
        _ctrl_c_between_steps() as stop_asked,
    ):
        for epoch in range(history.epochs_done, num_epochs):
            for batch in train_loader.batches(epoch, rows=rows):
                if stop_asked():
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                if mesh is not None:
                    batch = parallel.shard_batch(batch, mesh)
                state, metrics = step_fn(state, batch, key)
                _count_step(history, batch, float(metrics["loss"]), time.perf_counter() - t0, bar)
                step = int(state.step) - 1  # the book's global_step: 0 after the first update
                if step % eval_freq == 0:
                    losses = (eval_fn, train_loader, val_loader, eval_iter)
                    _evaluate(state.params, *losses, history, step, bar)
            history.epochs_done = epoch + 1
            if sample_fn is not None:
                history.samples.append(sample_fn(state.params))
                bar.write(f"Ep {epoch + 1} sample: {history.samples[-1]!r}")
            if epoch_metrics is not None:
                history.epoch_metrics.append(epoch_metrics(state.params))
                bar.write(
                    f"Ep {epoch + 1}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in history.epoch_metrics[-1].items())
                )
            if checkpoint_dir is not None:
                save_train_checkpoint(checkpoint_dir, state, cfg, history, meta)
            if stop_asked():
                raise KeyboardInterrupt
    return state, history


def _count_step(history: History, batch: tuple, loss: float, seconds: float, bar) -> None:
    """Add a step's tokens and examples to the history and show its loss and speed."""
    tokens = batch[0].size
    history.total_tokens += tokens
    history.total_examples += len(batch[0])
    bar.update()
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:,.0f}")


def _evaluate(params, eval_fn, train_loader, val_loader, eval_iter, history, step, bar) -> None:
    def metrics_of(x, y):
        value, aux = eval_fn(params, x, y)
        return {"loss": value, **aux}

    train = calc_metrics_loader(metrics_of, train_loader, eval_iter)
    val = calc_metrics_loader(metrics_of, val_loader, eval_iter)
    history.steps.append(step)
    history.tokens_seen.append(history.total_tokens)
    history.examples_seen.append(history.total_examples)
    history.train_losses.append(train.pop("loss"))
    history.val_losses.append(val.pop("loss"))
    if train:
        history.train_metrics.append(train)
        history.val_metrics.append(val)
    shown = "".join(f", {k} {train[k]:.3f} / {val.get(k, float('nan')):.3f}" for k in train)
    bar.write(
        f"Ep {history.epochs_done + 1} (Step {step:06d}): Train loss "
        f"{history.train_losses[-1]:.3f}, Val loss {history.val_losses[-1]:.3f}{shown}"
    )


# --- checkpoints and resuming (Book §5.4) ---------------------------------------------------------


@contextlib.contextmanager
def _ctrl_c_between_steps():
    """Yield a function that says whether Ctrl-C was pressed: the first Ctrl-C only asks the
    training loop to stop at its next step boundary (never inside a save); a second stops at once.
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach only main
        yield lambda: False
        return
    asked = []

    def handler(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(True)
        print("\nCtrl-C: stopping after this step (press again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, previous)


def save_train_checkpoint(
    directory, state: TrainState, cfg, history: History, meta: dict | None = None
) -> Path:
    """Save the params, optimizer state, history and `meta` as checkpoint history.epochs_done."""
    train_state = {"step": state.step, "opt_state": state.opt_state}
    meta = {**(meta or {}), "history": dataclasses.asdict(history)}
    return checkpoint.save_checkpoint(
        directory, history.epochs_done, state.params, cfg=cfg, train_state=train_state, meta=meta
    )


def resume(directory, state: TrainState, cfg) -> tuple[TrainState, History]:
    """The state and history of the latest checkpoint in `directory`, shaped like `state`."""
    train_like = {"step": state.step, "opt_state": state.opt_state}
    params, train, meta = checkpoint.load_checkpoint(
        directory, cfg=cfg, params_like=state.params, train_like=train_like
    )
    return TrainState(train["step"], params, train["opt_state"]), History(**meta["history"])
