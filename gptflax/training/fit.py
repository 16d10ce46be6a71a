"""`fit`: the book's train_model_simple (Book §5.2) on the training loop, and what it records.

Epochs of a DataLoader, an evaluation every `eval_freq` steps, and after each epoch a sample, the
epoch's metrics (e.g. accuracies, §6.7) and a checkpoint. The hooks it is built from are the ones
`gptflax.training.run` builds a pretraining run from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gptflax import checkpoint, parallel
from gptflax.data import DataLoader, Position
from gptflax.losses import loss_fn
from gptflax.training.loop import Every, Hook, Step, train_loop
from gptflax.training.step import TrainState, calc_metrics_loader, train_step


@dataclasses.dataclass
class History:
    """What a run records at every evaluation, and the samples it prints after each epoch."""

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
    state, step_fn, prepare = jit_train_step(state, cfg, tx, loss, has_aux, mesh, strategy)
    rows = parallel.local_rows(mesh, train_loader.batch_size) if mesh is not None else None

    def at_epoch_end(step: Step) -> None:
        history.epochs_done = step.position.epoch + 1
        if sample_fn is not None:
            history.samples.append(sample_fn(step.state.params))
            tqdm.write(f"Ep {history.epochs_done} sample: {history.samples[-1]!r}")
        if epoch_metrics is not None:
            history.epoch_metrics.append(epoch_metrics(step.state.params))
            shown = ", ".join(f"{k} {v:.4f}" for k, v in history.epoch_metrics[-1].items())
            tqdm.write(f"Ep {history.epochs_done}: {shown}")
        if checkpoint_dir is not None:
            save_train_checkpoint(checkpoint_dir, step.state, cfg, history, meta)

    hooks = [
        Progress(num_epochs * len(train_loader), int(state.step)),
        Record(history),
        Every(eval_freq, Evaluate(loss, has_aux, train_loader, val_loader, eval_iter, history),
              first=1),  # the book's global_step 0, eval_freq, ...: after steps 1, 1 + freq, ...
        EpochEnd(len(train_loader), at_epoch_end),
    ]  # fmt: skip
    batches = train_loader.epoch_batches(num_epochs, Position(history.epochs_done, 0), rows)
    state, stopped = train_loop(state, batches, step_fn, key, hooks, prepare=prepare)
    if stopped:
        raise KeyboardInterrupt
    return state, history


def jit_train_step(
    state, cfg, tx, loss: Callable, has_aux: bool, mesh=None, strategy="dp", accum_steps=1
):
    """(a copy of the state, the jitted train step, how to place a batch): on one device, or
    placed on `mesh` as `strategy` says, the batch in `accum_steps` micro-batches. The step
    donates its state's buffers to the next."""
    step_fn = partial(train_step, loss=loss, tx=tx, has_aux=has_aux, accum_steps=accum_steps)
    if mesh is None:
        state = jax.tree.map(jnp.copy, state)  # ours to donate; the caller's arrays stay valid
        return state, jax.jit(step_fn, donate_argnums=0), None
    state, step_fn = parallel.jit_sharded(step_fn, state, cfg, mesh, strategy, donate_argnums=0)
    return state, step_fn, partial(parallel.shard_batch, mesh=mesh)


class Progress(Hook):
    """A progress bar of steps with the latest loss and tokens/s."""

    def __init__(self, total: int, initial: int = 0):
        self.bar = tqdm(total=total, initial=initial, unit="step", mininterval=1.0)

    def after_step(self, step: Step) -> None:
        loss = float(step.metrics["loss"])
        tokens = step.batch[0].size
        self.bar.update()
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / step.seconds:,.0f}")

    def at_end(self, last, stopped) -> None:
        self.bar.close()


class Record(Hook):
    """Counts the tokens and examples the run has trained on."""

    def __init__(self, history: History):
        self.history = history

    def after_step(self, step: Step) -> None:
        self.history.total_tokens += step.batch[0].size
        self.history.total_examples += len(step.batch[0])


class EpochEnd(Hook):
    """`fn(step)` after an epoch's last step (its batch is the loader's last)."""

    def __init__(self, batches_per_epoch: int, fn: Callable[[Step], None]):
        self.batches_per_epoch, self.fn = batches_per_epoch, fn

    def after_step(self, step: Step) -> None:
        if step.position.index == self.batches_per_epoch - 1:
            self.fn(step)


class Evaluate:
    """Mean losses (and a has_aux loss's metrics) over the first `eval_iter` batches of the
    training and validation loaders, recorded in the history and printed (Book §5.2)."""

    def __init__(self, loss, has_aux, train_loader, val_loader, eval_iter: int, history: History):
        self.eval_fn = jax.jit(loss if has_aux else lambda *args: (loss(*args), {}))
        self.loaders, self.eval_iter, self.history = (train_loader, val_loader), eval_iter, history

    def __call__(self, step: Step) -> None:
        def metrics_of(x, y):
            value, aux = self.eval_fn(step.state.params, x, y)
            return {"loss": value, **aux}

        train, val = (calc_metrics_loader(metrics_of, ld, self.eval_iter) for ld in self.loaders)
        h = self.history
        h.steps.append(step.number - 1)  # the book's global_step: 0 after the first update
        h.tokens_seen.append(h.total_tokens)
        h.examples_seen.append(h.total_examples)
        h.train_losses.append(train.pop("loss"))
        h.val_losses.append(val.pop("loss"))
        if train:
            h.train_metrics.append(train)
            h.val_metrics.append(val)
        shown = "".join(f", {k} {train[k]:.3f} / {val.get(k, float('nan')):.3f}" for k in train)
        tqdm.write(
            f"Ep {step.position.epoch + 1} (Step {step.number - 1:06d}): Train loss "
            f"{h.train_losses[-1]:.3f}, Val loss {h.val_losses[-1]:.3f}{shown}"
        )


# --- checkpoints and resuming (Book §5.4) ---------------------------------------------------------


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
