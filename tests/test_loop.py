"""The training loop: any stream of batches, actions between steps, stopping only between steps."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax.data import DataLoader
from gptflax.training import Every, Hook, Position, train_loop

pytestmark = pytest.mark.lab5


class State:
    """A stand-in train state: a step counter and a running sum of the batches."""

    def __init__(self, step, total):
        self.step, self.total = step, total


def add_step(state, batch, key):  # a "method" that only adds its batch to a sum
    return State(state.step + 1, state.total + batch[0].sum()), {"loss": jnp.float32(0)}


class Recorder(Hook):
    def __init__(self):
        self.seen, self.ended = [], None

    def after_step(self, step):
        self.seen.append((step.number, step.position))

    def at_end(self, last, stopped):
        self.ended = (last.number if last else None, stopped)


def test_a_stream_the_method_makes_itself_runs_with_actions_between_steps():
    """E.g. GRPO: generate, score, then step. Here the batches come from a generator."""

    def made_batches():
        for i in range(7):
            yield Position(0, i), (np.full(3, i),)

    every_third, recorder = [], Recorder()
    hooks = [recorder, Every(3, lambda s: every_third.append(s.number), at_end=True)]
    state, stopped = train_loop(State(0, 0), made_batches(), add_step, jax.random.key(0), hooks)
    assert stopped is None and state.step == 7 and int(state.total) == 3 * sum(range(7))
    assert [n for n, _ in recorder.seen] == list(range(1, 8)) and recorder.ended == (7, None)
    assert every_third == [3, 6, 7]  # and once more after the last step (at_end)
    book = []
    train_loop(
        State(0, 0),
        made_batches(),
        add_step,
        None,
        [Every(5, lambda s: book.append(s.number), first=1)],
    )
    assert book == [1, 6]  # the book's evaluation: global_step 0, 5, ...


def test_epoch_batches_from_any_position_are_the_rest_of_the_full_order():
    data = np.arange(20)
    loader = DataLoader(data, batch_size=3, shuffle=True, seed=4)
    full = list(loader.epoch_batches(3))
    assert [p for p, _ in full][:7] == [Position(0, i) for i in range(6)] + [Position(1, 0)]
    rest = list(loader.epoch_batches(3, Position(1, 4)))
    assert [p for p, _ in rest] == [p for p, _ in full][10:]
    assert all(np.array_equal(a[0], b[0]) for (_, a), (_, b) in zip(rest, full[10:], strict=True))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_loop_between_steps(sig):
    recorder = Recorder()
    stop_at_3 = Every(3, lambda s: os.kill(os.getpid(), sig), first=3)
    batches = ((Position(0, i), (np.ones(2),)) for i in range(100))
    before = signal.getsignal(sig)
    state, stopped = train_loop(State(0, 0), batches, add_step, None, [stop_at_3, recorder])
    assert stopped == sig.name and state.step == 3  # the step under way finished, no other ran
    assert recorder.ended == (3, sig.name) and signal.getsignal(sig) is before


def test_a_second_ctrl_c_stops_at_once():
    def twice(step):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    batches = ((Position(0, i), (np.ones(2),)) for i in range(100))
    with pytest.raises(KeyboardInterrupt):
        train_loop(State(0, 0), batches, add_step, None, [Every(2, twice)])
