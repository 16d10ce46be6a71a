"""The training loop: optimizer steps over any stream of batches, with actions between steps.

    state, stopped = train_loop(state, batches, step_fn, key, hooks=[Every(100, evaluate), ...])

`batches` yields (Position, batch) pairs: where each batch sits in the data (epoch, index) and
the batch itself, from a loader's `epoch_batches`, or from a method that makes its
own batches (generate, score, then step). `step_fn(state, batch, key) -> (state, metrics)` is the
jitted step. After each step every hook's `after_step` sees it; when the stream ends or the run
is stopped, every hook's `at_end` does. Stopping happens only between steps: the first Ctrl-C
(SIGINT) or SIGTERM (how SLURM and Kubernetes stop a job) asks the loop to stop after the step
under way; a second Ctrl-C stops at once (a KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jax

from gptflax.data import Position


@dataclass
class Step:
    """What the hooks see after a step: the new state, the step's metrics (device arrays), the
    batch, where it came from, and how long the step took (dispatch to result)."""

    state: object
    metrics: dict
    batch: tuple
    position: Position
    seconds: float

    @property
    def number(self) -> int:
        """Optimizer steps taken so far, this one included."""
        return int(self.state.step)


class Hook:
    """An action between steps; both methods do nothing unless a hook overrides them."""

    def after_step(self, step: Step) -> None:
        """Called after every step."""

    def at_end(self, last: Step | None, stopped: str | None) -> None:
        """Called once, after the last step (`last` is None if none ran); `stopped` names the
        signal that stopped the run ("SIGINT", "SIGTERM"), or is None when the data ran out."""


class Every(Hook):
    """`fn(step)` after every n-th step from step `first` on (step numbers count optimizer steps
    from 1: first, first + n, ...); with `at_end`, also after the last step if it was not one."""

    def __init__(self, n: int, fn: Callable[[Step], None], *, first: int | None = None,
                 at_end: bool = False):  # fmt: skip
        self.n, self.fn, self.first, self.final = n, fn, n if first is None else first, at_end
        self.last_called = None

    def after_step(self, step: Step) -> None:
        if step.number >= self.first and (step.number - self.first) % self.n == 0:
            self.fn(step)
            self.last_called = step.number

    def at_end(self, last: Step | None, stopped: str | None) -> None:
        if self.final and last is not None and self.last_called != last.number:
            self.fn(last)


def train_loop(
    state, batches: Iterable, step_fn: Callable, key: jax.Array, hooks=(), *, prepare=None
) -> tuple[object, str | None]:
    """Run `step_fn` over `batches` with the hooks between steps (see the module's docstring);
    `prepare(batch)` places each batch first (e.g. splits it over devices). Returns the final
    state and what stopped the run (None when the data ran out)."""
    last, batches = None, iter(batches)
    with stop_requests() as stop:
        while not stop.reason:  # checked before the next batch is read: none is taken unused
            try:
                position, batch = next(batches)
            except StopIteration:
                break
            t0 = time.perf_counter()
            state, metrics = step_fn(state, prepare(batch) if prepare else batch, key)
            jax.block_until_ready(metrics)  # the step's time, and hooks see a finished step
            last = Step(state, metrics, batch, position, time.perf_counter() - t0)
            for hook in hooks:
                hook.after_step(last)
        getattr(batches, "close", lambda: None)()  # a generator's reader ends now, not at exit
        for hook in hooks:
            hook.at_end(last, stop.reason)
    return state, stop.reason


class _Stop:
    reason: str | None = None


@contextlib.contextmanager
def stop_requests():
    """Yield an object whose `reason` becomes "SIGINT" or "SIGTERM" when one arrives: the loop
    stops before its next step (never inside a step or a save); a second Ctrl-C raises
    KeyboardInterrupt at once. Outside the main thread (where signals never arrive), nothing."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop.reason and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not stop.reason:
            stop.reason = name
            again = " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            print(f"\n{name}: stopping after this step{again}", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
