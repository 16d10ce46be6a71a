"""Checkpoints (Book §5.4): round trip, atomic saves, and clear errors for the wrong or broken."""

import shutil

import jax
import numpy as np
import pytest

from gptflax import checkpoint, models
from gptflax.checkpoint import CheckpointError
from gptflax.train import init_train_state, make_optimizer

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
    partial = directory / "2.orbax-checkpoint-tmp-1234567890"  # how orbax stages a save
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "junk").write_bytes(b"half")
    assert checkpoint.latest_step(directory) == 1
    params, _, _ = checkpoint.load_checkpoint(directory, cfg=small_cfg, params_like=state.params)
    jax.tree.map(np.testing.assert_array_equal, params, state.params)


def test_the_next_save_clears_what_cut_short_saves_left(saved, small_cfg):
    directory, state, _ = saved
    staged = directory / "2.orbax-checkpoint-tmp-1234567890"  # a save killed while staging
    (staged / "params").mkdir(parents=True)
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
