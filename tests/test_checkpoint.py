"""Checkpoints (Book §5.4): round trip, atomic saves, and clear errors for the wrong or broken."""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from gptflax import checkpoint, models
from gptflax.checkpoint import CheckpointError
from gptflax.training import init_train_state, make_optimizer

pytestmark = pytest.mark.lab5


@pytest.fixture
def saved(tmp_path, small_cfg):
    tx = make_optimizer()
    state = init_train_state(models.init_params(jax.random.key(0), small_cfg), tx)
    train = {"step": state.step, "opt_state": state.opt_state}
    checkpoint.save_checkpoint(
        tmp_path, 1, state.params, cfg=small_cfg, train_state=train, meta={"note": "hi"}
    )
    return tmp_path, state, train


def test_round_trip_restores_values_and_structures(saved, small_cfg):
    directory, state, train = saved
    like = jax.eval_shape(lambda: (state.params, train))
    params, train_back, meta = checkpoint.load_checkpoint(
        directory, cfg=small_cfg, params_like=like[0], train_like=like[1]
    )
    jax.tree.map(np.testing.assert_array_equal, params, state.params)
    assert jax.tree.structure(train_back) == jax.tree.structure(train)  # optax named tuples
    assert meta["note"] == "hi" and meta["config"] == small_cfg
    assert checkpoint.latest_step(directory) == 1


def test_another_configuration_is_refused_clearly(saved, small_cfg):
    directory, state, _ = saved
    other = small_cfg.replace(n_layers=3)
    with pytest.raises(CheckpointError, match="was saved for GPTConfig"):
        checkpoint.load_checkpoint(directory, cfg=other, params_like=state.params)


def test_a_damaged_checkpoint_is_refused_clearly(saved, small_cfg):
    directory, state, _ = saved
    for f in (directory / "1" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        checkpoint.load_checkpoint(directory, cfg=small_cfg, params_like=state.params)


def test_a_save_cut_short_is_never_listed_or_loaded(saved, small_cfg):
    directory, state, _ = saved
    partial = directory / ".saving-2-999999-abcd" / "2"  # a save staged by a dead process
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "junk").write_bytes(b"half")
    assert checkpoint.latest_step(directory) == 1
    params, _, _ = checkpoint.load_checkpoint(directory, cfg=small_cfg, params_like=state.params)
    jax.tree.map(np.testing.assert_array_equal, params, state.params)


def test_the_next_save_clears_what_cut_short_saves_left(saved, small_cfg):
    directory, state, _ = saved
    staged = directory / ".saving-2-999999-abcd"  # a save killed while staging (dead pid)
    (staged / "2" / "params").mkdir(parents=True)
    older = directory / "4.orbax-checkpoint-tmp-1234567890"  # staged by an older gptflax
    older.mkdir()
    unmarked = directory / "3"  # a step folder without orbax's commit marker
    shutil.copytree(directory / "1", unmarked)
    (unmarked / checkpoint.COMMIT_MARKER).unlink()
    assert checkpoint.complete_steps(directory) == [1] and checkpoint.latest_step(directory) == 1
    checkpoint.save_checkpoint(directory, 3, state.params, cfg=small_cfg)  # not blocked by "3"
    assert sorted(p.name for p in directory.iterdir()) == ["1", "3"]
    assert checkpoint.complete_steps(directory) == [1, 3]
    params, _, _ = checkpoint.load_checkpoint(directory, cfg=small_cfg, params_like=state.params)
    jax.tree.map(np.testing.assert_array_equal, params, state.params)


def test_an_existing_checkpoint_is_never_overwritten(saved, small_cfg):
    directory, state, _ = saved
    before = sorted(p.name for p in (directory / "1").rglob("*"))
    with pytest.raises(CheckpointError, match="not overwriting"):
        checkpoint.save_checkpoint(directory, 1, state.params, cfg=small_cfg)
    assert sorted(p.name for p in (directory / "1").rglob("*")) == before


def test_missing_checkpoints_are_clear_errors(tmp_path, small_cfg):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        checkpoint.read_meta(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.read_meta(tmp_path / "empty")


def test_flipped_bytes_in_any_file_are_found_and_nothing_damaged_is_returned(saved, small_cfg):
    """4 bytes flipped in each file of a checkpoint in turn: one line names the checkpoint and
    what to do; the arrays are never handed back."""
    directory, state, _ = saved
    pristine = directory.parent / "pristine"
    shutil.copytree(directory, pristine)
    names = sorted(
        str(f.relative_to(pristine / "1"))
        for f in (pristine / "1").rglob("*")
        if f.is_file() and f.stat().st_size >= 4 and f.name != checkpoint.CHECKSUMS
    )
    assert len(names) > 10 and any("ocdbt" in n for n in names)  # every kind of file orbax writes
    for name in names:
        shutil.rmtree(directory / "1")
        shutil.copytree(pristine / "1", directory / "1")
        f = directory / "1" / name
        data = bytearray(f.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
        f.write_bytes(bytes(data))
        with pytest.raises(CheckpointError) as err:
            checkpoint.load_checkpoint(directory, cfg=small_cfg, params_like=state.params)
        message = str(err.value)
        assert f"{directory}/1 is damaged" in message and "delete that folder" in message, name
        assert len(message.splitlines()) <= 3


def test_two_saves_of_one_step_end_with_one_checkpoint_and_a_clear_error(tmp_path):
    """Two processes save step 5 into one folder at once: one complete checkpoint, and the other
    a one-line error (or the refusal to overwrite, if the first finished before it began)."""
    script = "\n".join([
        "import sys, jax",
        "from gptflax import checkpoint, models",
        "from gptflax.config import TINY",
        "params = models.init_params(jax.random.key(int(sys.argv[2])), TINY)",
        "print('ready', flush=True)",
        "sys.stdin.readline()",
        "try:",
        "    checkpoint.save_checkpoint(sys.argv[1], 5, params, cfg=TINY)",
        "    print('saved')",
        "except checkpoint.CheckpointError as e:",
        "    print('error:', e)",
    ])  # fmt: skip
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(seed)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for seed in (1, 2)]  # fmt: skip
    for run in runs:
        assert run.stdout.readline() == "ready\n"
    for run in runs:
        run.stdin.write("go\n")
        run.stdin.flush()
    outcomes = sorted(run.communicate(timeout=120)[0].strip().splitlines()[-1] for run in runs)
    assert outcomes[1] == "saved", outcomes
    assert outcomes[0].startswith("error: ") and (
        "written by another save while this one ran" in outcomes[0]
        or "already has checkpoint 5" in outcomes[0]
    ), outcomes
    assert checkpoint.complete_steps(tmp_path) == [5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5"]  # no staging left behind
    checkpoint.load_model(tmp_path)  # and it verifies
