"""Checkpoints with orbax (Book §5.4): params, optimizer state and a JSON record, saved atomically
and checked when loaded.

A checkpoint directory holds one numbered sub-directory per save (the step, in a training run).
Each has three items: `params`, `train` (step and optimizer state) and `meta` (the model config
and whatever the caller records, e.g. the loss history), and `checksums.json`, the sha256 of every
file. A save is written into a staging folder of its own (orbax commits it there), its checksums
added, then renamed into place: a save cut short is never listed or loaded (the next save deletes
what a dead one left), and of two saves of one step into one directory one completes and the other
gets a clear error. Loading verifies the checksums first: a flipped byte anywhere gives a one-line
error naming the checkpoint, and nothing damaged is returned. (Checkpoints written before
checksums were recorded load unverified.)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gptflax.decoding import check_trainable
from gptflax.files import sha256_of
from gptflax.models import config_from_dict, config_to_dict, init_params


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or was saved for another model."""


COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a save before renaming it into place
CHECKSUMS = "checksums.json"
SAVING = ".saving-"  # a save's staging folder: .saving-<step>-<pid>-<token>


def _is_complete(folder: Path) -> bool:
    return (folder / COMMIT_MARKER).is_file()


def complete_steps(directory: str | Path) -> list[int]:
    """The steps of `directory`'s complete checkpoints: numbered folders with the commit marker."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _is_complete(p))


def _remove_leftovers(directory: Path) -> None:
    """Delete what saves cut short left behind: numbered folders without the commit marker, and
    staging folders whose process has died (a live save's staging is left alone)."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith(SAVING) and not _alive(int(p.name.split("-")[2])):
            shutil.rmtree(p, ignore_errors=True)
        elif (p.name.isdigit() and not _is_complete(p)) or ".orbax-checkpoint-tmp" in p.name:
            shutil.rmtree(p, ignore_errors=True)  # the latter: staged by an older gptflax


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _manager(directory: str | Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_checkpoint(
    directory: str | Path,
    step: int,
    params: dict,
    *,
    cfg,
    train_state: dict | None = None,
    meta: dict | None = None,
) -> Path:
    """Save params (and optionally {"step", "opt_state"} and JSON `meta`) as checkpoint `step`,
    after deleting what earlier saves cut short left in `directory`. Arrays split over devices
    are saved as they are: in a multi-process run, every process calls this and writes its own
    shards."""
    check_trainable(params)
    directory = Path(directory).absolute()
    if step in complete_steps(directory):
        raise CheckpointError(f"{directory} already has checkpoint {step}: not overwriting it")
    directory.mkdir(parents=True, exist_ok=True)
    owner = np.array([os.getpid(), secrets.randbits(31)])
    if jax.process_count() > 1:  # every process writes into process 0's staging folder
        owner = multihost_utils.broadcast_one_to_all(owner)
    if jax.process_index() == 0:
        _remove_leftovers(directory)
    staging = directory / f"{SAVING}{step}-{owner[0]}-{owner[1]:08x}"
    items = {
        "params": ocp.args.StandardSave(params),
        "meta": ocp.args.JsonSave({"config": config_to_dict(cfg), **(meta or {})}),
    }
    if train_state is not None:
        items["train"] = ocp.args.StandardSave(train_state)
    with _manager(staging) as mngr:
        mngr.save(step, args=ocp.args.Composite(**items))
    final = directory / str(step)
    if jax.process_index() == 0:
        try:
            _write_checksums(staging / str(step))
            os.rename(staging / str(step), final)  # atomic; refused if the step exists already
        except OSError as e:
            raise CheckpointError(
                f"checkpoint {final} was written by another save while this one ran ({e.strerror}):"
                " this save is not kept"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"gptflax: checkpoint {step} in place")
    return final


def _write_checksums(folder: Path) -> None:
    """Record the sha256 and size of every file of a checkpoint folder in its checksums.json."""
    record = {str(f.relative_to(folder)): [f.stat().st_size, sha256_of(f)]
              for f in sorted(folder.rglob("*")) if f.is_file()}  # fmt: skip
    tmp = folder / f".{CHECKSUMS}.part"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / CHECKSUMS)


def verify(directory: str | Path, step: int, item: str | None = None) -> None:
    """Check the files of checkpoint `step` (or of one of its items) against its checksums: a
    CheckpointError naming the first that differs, or is missing."""
    folder = Path(directory) / str(step)
    record_path = folder / CHECKSUMS
    if not record_path.is_file():
        return  # written before checksums were recorded
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        raise _damaged(directory, step, f"its {CHECKSUMS} is not readable") from None
    for name, (size, digest) in record.items():
        if item is not None and not name.startswith(f"{item}/"):
            continue
        f = folder / name
        if not f.is_file() or f.stat().st_size != size or sha256_of(f) != digest:
            raise _damaged(directory, step, f"{name} does not match its checksum")


def remove_old(directory: str | Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints; the steps deleted."""
    old = complete_steps(directory)[:-keep]
    for step in old:
        shutil.rmtree(Path(directory) / str(step))
    return old


def latest_step(directory: str | Path) -> int | None:
    """The newest complete checkpoint in `directory`, or None."""
    steps = complete_steps(directory)
    return steps[-1] if steps else None


def read_meta(directory: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of checkpoint `step` (default: the latest); meta["config"] is the model's
    config (a GPTConfig, or another family's)."""
    step = _existing_step(directory, step)
    verify(directory, step, "meta")
    with _manager(directory) as mngr:
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for a broken file
            raise _damaged(directory, step, f"orbax cannot read it ({type(e).__name__})") from e
    meta["config"] = config_from_dict(meta["config"])
    return step, meta


def load_checkpoint(
    directory: str | Path,
    *,
    cfg,
    params_like: dict,
    train_like: dict | None = None,
    step: int | None = None,
) -> tuple[dict, dict | None, dict]:
    """Restore (params, train_state or None, meta), checking that the checkpoint holds weights
    of `cfg`'s architecture (dropout and the attention kernel may differ: they are ways to run).

    `params_like` / `train_like` give the structure, shapes and dtypes to restore into (arrays or
    `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`), and where: leaves with a sharding are
    restored split that way, whatever mesh the checkpoint was saved from (each process reading
    its own shards); the others onto one device.
    """
    step, meta = read_meta(directory, step)
    if not meta["config"].same_weights_as(cfg):
        raise CheckpointError(
            f"checkpoint {directory}/{step} was saved for {meta['config']}, "
            f"not for {cfg}: load it with its own config (gptflax.checkpoint.read_meta tells it)"
        )
    params, train = _restore_arrays(directory, step, params_like, train_like)
    return params, train, meta


def load_model(directory: str | Path, step: int | None = None) -> tuple[object, dict]:
    """(cfg, params) of checkpoint `step` (default: the latest), in the config it was saved with."""
    step, meta = read_meta(directory, step)
    cfg = meta["config"]
    like = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    params, _ = _restore_arrays(directory, step, like, None)
    return cfg, params


def _restore_arrays(directory, step: int, params_like: dict, train_like: dict | None) -> tuple:
    """(params, train_state or None) of checkpoint `step`, in the structures of the templates."""
    verify(directory, step)
    items = {"params": ocp.args.StandardRestore(_abstract(params_like))}
    if train_like is not None:
        items["train"] = ocp.args.StandardRestore(_abstract(train_like))
    with _manager(directory) as mngr:
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise _damaged(directory, step, f"orbax cannot read it ({type(e).__name__})") from e
    # Orbax hands back plain tuples for optax's named tuples: rebuild the exact structures.
    params = _like(params_like, restored.params)
    train = _like(train_like, restored.train) if train_like is not None else None
    return params, train


def _existing_step(directory: str | Path, step: int | None) -> int:
    if not Path(directory).is_dir():
        raise CheckpointError(f"no checkpoint directory {directory}")
    steps = complete_steps(directory)
    if not steps:
        raise CheckpointError(f"{directory} holds no complete checkpoint")
    if step is None:
        return max(steps)
    if step not in steps:
        raise CheckpointError(f"{directory} has no checkpoint {step}; it has {sorted(steps)}")
    return step


def _damaged(directory, step, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {directory}/{step} is damaged or incomplete: {reason}; delete that folder "
        "and resume from an earlier checkpoint"
    )


def _abstract(tree):
    """Shapes and dtypes to restore into, placed on this process's first device unless the
    template says where: a checkpoint saved from a mesh of several devices loads on one."""
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(leaf):
        spec = ocp.utils.to_shape_dtype_struct(leaf)
        if getattr(spec, "sharding", None) is None:
            spec = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=one_device)
        return spec

    return jax.tree.map(target, tree)


def _like(template, restored):
    leaves = jax.tree.leaves(restored)
    treedef = jax.tree.structure(template)
    if treedef.num_leaves != len(leaves):
        raise CheckpointError(
            f"checkpoint holds {len(leaves)} arrays, expected {treedef.num_leaves}"
        )
    return jax.tree.unflatten(treedef, leaves)
