"""A pretraining run (gptflax.training.run): one validated record, checkpoints by step, resumed at
any step to exactly the uninterrupted run, its folder checked and locked, its data fingerprinted,
and checkpoints of the code before runs were records still resumed."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from gptflax import checkpoint, files, models
from gptflax.config import TINY as TINY_CFG
from gptflax.data import train_val_loaders
from gptflax.training import fit, init_train_state, make_optimizer
from gptflax.training.run import Run, RunDir, RunError, pretrain, resume_run

pytestmark = pytest.mark.lab5

TINY = dict(model="tiny", context_length=16, batch_size=4, eval_freq=3, eval_iter=1, epochs=2)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "story.txt"
    path.write_text(files.resolve("the-verdict.txt").read_text(encoding="utf-8")[:3000])
    return path


def leaves_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_the_run_record_is_validated_and_round_trips_json():
    run = Run(**TINY, checkpoint_every=2)
    assert Run.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    for bad, message in [
        (dict(lr=float("inf")), "lr: must be a finite number, got inf"),
        (dict(lr=0.0), "lr: must be above 0, got 0.0"),
        (dict(epochs=0), "epochs: must be at least 1, got 0"),
        (dict(warmup=1.0), "warmup: must be at least 0 and below 1"),
        (dict(model="7B"), "model: one of 124M, 355M"),
        (dict(init="gpt5"), "init: one of gpt2-124m"),
        (dict(strategy="zero3"), "strategy: one of dp, fsdp, tp, fsdp+tp"),
        (dict(batch_size=2.5), "batch_size: must be a whole number"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
            Run(**bad)


@pytest.mark.parametrize("strategy, mesh", [("dp", "data=1"), ("fsdp", "data=2")])
def test_a_run_resumed_mid_epoch_equals_the_uninterrupted_run(text, tmp_path, strategy, mesh):
    run = Run(data=str(text), **TINY, drop_rate=0.1, checkpoint_every=2, keep=10,
              strategy=strategy, mesh=mesh)  # fmt: skip
    whole = pretrain(run, tmp_path / "whole")
    ckpts = tmp_path / "whole" / "checkpoints"
    steps = checkpoint.complete_steps(ckpts)
    assert whole.stopped is None and whole.history.epochs_done == 2
    assert steps[-1] == int(whole.state.step)
    mid = next(s for s in steps if checkpoint.read_meta(ckpts, s)[1]["position"]["index"] > 0)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for step in checkpoint.complete_steps(cut / "checkpoints"):
        if step > mid:
            shutil.rmtree(cut / "checkpoints" / str(step))
    resumed = resume_run(cut)
    h, w = resumed.history, whole.history
    assert (h.train_losses, h.val_losses, h.tokens_seen) == (
        w.train_losses,
        w.val_losses,
        w.tokens_seen,
    )
    assert leaves_equal(resumed.state.params, whole.state.params)


def test_checkpoints_every_n_steps_keep_the_newest(text, tmp_path):
    result = pretrain(Run(data=str(text), **TINY, checkpoint_every=1, keep=2), tmp_path)
    last = int(result.state.step)
    assert checkpoint.complete_steps(tmp_path / "checkpoints") == [last - 1, last]
    assert result.checkpoint == tmp_path / "checkpoints" / str(last)
    meta = checkpoint.read_meta(tmp_path / "checkpoints")[1]
    assert meta["position"] == {"epoch": 2, "index": 0} and meta["tokenizer"] == "gpt2"
    assert meta["data"]["sha256"] == files.sha256_of(text)
    with pytest.raises(RunError, match="holds checkpoints: resume the run"):
        pretrain(Run(data=str(text), **TINY), tmp_path)
    with pytest.raises(RunError, match=r"has taken all \d+ steps of its 2 epochs"):
        resume_run(tmp_path)


def test_resume_refuses_other_data_unless_accepted(text, tmp_path):
    pretrain(Run(data=str(text), **{**TINY, "epochs": 1}), tmp_path / "run")
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[::-1])
    with pytest.raises(
        RunError, match=r"the data differs from the run's: .*other.txt .* now, .*/story.txt"
    ):
        resume_run(tmp_path / "run", data=str(other), epochs=2)
    text_copy = tmp_path / "same.txt"
    text_copy.write_text(text.read_text())  # the same bytes elsewhere: another file
    with pytest.raises(RunError, match="the data differs"):
        resume_run(tmp_path / "run", data=str(text_copy), epochs=2)
    result = resume_run(tmp_path / "run", data=str(other), epochs=2, accept_new_data=True)
    assert result.stopped is None and result.history.epochs_done == 2
    with pytest.raises(RunError, match=r"another model than context_length=32 \(the run's is 16\)"):
        resume_run(tmp_path / "run", context_length=32, epochs=3)


def test_the_run_folder_is_checked_and_locked_before_anything_trains(text, tmp_path):
    run = Run(data=str(text), **TINY)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file, not a folder"):
        pretrain(run, tmp_path / "file")
    with pytest.raises(RunError, match="cannot write into /proc/gptflax"):
        pretrain(run, "/proc/gptflax/run")
    with RunDir(tmp_path / "busy"), pytest.raises(RunError, match=r"in use by another run \(pid"):
        pretrain(run, tmp_path / "busy")
    (tmp_path / "killed").mkdir()
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)")  # fmt: skip
    lock = str(tmp_path / "killed" / ".lock")
    holder = subprocess.Popen([sys.executable, "-c", hold, lock], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(RunError, match="in use by another run"):
        pretrain(run, tmp_path / "killed")
    holder.kill()
    holder.wait()
    assert pretrain(run.replace(epochs=1), tmp_path / "killed").stopped is None  # not stuck


def test_a_checkpoint_of_the_epoch_loop_still_resumes(text, tmp_path):
    """What `python -m gptflax train` wrote before runs were records: checkpoints numbered by
    epoch, the options instead of the run, no position (it is the next epoch's start)."""
    old = Run(data=str(text), **TINY)
    options = {**{k: v for k, v in old.to_dict().items()
                  if k not in ("data", "keep", "checkpoint_every", "init")},
               "text": str(text), "mesh": {"data": 1}}  # fmt: skip
    cfg = TINY_CFG.replace(context_length=16)
    tx = make_optimizer(old.lr, old.weight_decay)
    loaders = train_val_loaders(text.read_text(), 16, 4)
    state, history = fit(
        init_train_state(models.init_params(jax.random.key(0), cfg), tx), *loaders, cfg, tx,
        num_epochs=1, key=jax.random.key(1), eval_freq=3, eval_iter=1,
        checkpoint_dir=tmp_path / "checkpoints", meta={"options": options},
    )  # fmt: skip
    assert checkpoint.complete_steps(tmp_path / "checkpoints") == [1]  # epoch 1
    result = resume_run(tmp_path, epochs=2)
    assert result.history.epochs_done == 2 and int(result.state.step) == 2 * len(loaders[0])
    assert result.history.train_losses[: len(history.train_losses)] == history.train_losses
