"""Checkpoints with orbax (Book §5.4): params, optimizer state and a JSON record, saved atomically.

A checkpoint directory holds one numbered sub-directory per save (the epoch, in `fit`). Each has
three items: `params`, `train` (step and optimizer state) and `meta` (the model config and whatever
the caller records, e.g. the loss history). Orbax writes a save into a temporary directory, puts
its commit marker in last and renames it into place, so a save cut short is never listed or
loaded; the next save deletes what it left behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gptflax.decoding import check_trainable
from gptflax.models import config_from_dict, config_to_dict, init_params


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or was saved for another model."""


COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a save before renaming it into place
STAGING = ".orbax-checkpoint-tmp"  # orbax stages save N in N.orbax-checkpoint-tmp-<timestamp>


def _is_complete(folder: Path) -> bool:
    return (folder / COMMIT_MARKER).is_file()


def complete_steps(directory: str | Path) -> list[int]:
    """The steps of `directory`'s complete checkpoints: numbered folders with the commit marker."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _is_complete(p))


def _remove_leftovers(directory: Path) -> None:
    """Delete what saves cut short left behind: staging folders and numbered folders without
    the commit marker (neither can be loaded)."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.is_dir() and (STAGING in p.name or (p.name.isdigit() and not _is_complete(p))):
            shutil.rmtree(p)


def _manager(directory: str | Path, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_checkpoint(
    directory: str | Path,
    step: int,
    params: dict,
    *,
    cfg,
    train_state: dict | None = None,
    meta: dict | None = None,
    max_to_keep: int | None = None,
) -> Path:
    """Save params (and optionally {"step", "opt_state"} and JSON `meta`) as checkpoint `step`,
    after deleting what earlier saves cut short left in `directory`. Arrays split over devices
    are saved as they are: in a multi-process run, every process calls this and writes its own
    shards."""
    check_trainable(params)
    if step in complete_steps(directory):
        raise CheckpointError(f"{directory} already has checkpoint {step}: not overwriting it")
    if jax.process_index() == 0:
        _remove_leftovers(Path(directory))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gptflax: leftovers removed")
    items = {
        "params": ocp.args.StandardSave(params),
        "meta": ocp.args.JsonSave({"config": config_to_dict(cfg), **(meta or {})}),
    }
    if train_state is not None:
        items["train"] = ocp.args.StandardSave(train_state)
    with _manager(directory, max_to_keep) as mngr:
        mngr.save(step, args=ocp.args.Composite(**items))
    return Path(directory) / str(step)


def latest_step(directory: str | Path) -> int | None:
    """The newest complete checkpoint in `directory`, or None."""
    steps = complete_steps(directory)
    return steps[-1] if steps else None


def read_meta(directory: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of checkpoint `step` (default: the latest); meta["config"] is the model's
    config (a GPTConfig, or another family's)."""
    step = _existing_step(directory, step)
    with _manager(directory) as mngr:
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for a broken file
            raise _damaged(directory, step, e) from e
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
    items = {"params": ocp.args.StandardRestore(_abstract(params_like))}
    if train_like is not None:
        items["train"] = ocp.args.StandardRestore(_abstract(train_like))
    with _manager(directory) as mngr:
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise _damaged(directory, step, e) from e
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


def _damaged(directory, step, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {directory}/{step} is damaged or incomplete ({type(error).__name__}: "
        f"{str(error)[:300]}); delete that folder and resume from an earlier checkpoint"
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
