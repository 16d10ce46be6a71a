"""Training on many devices with `jax.sharding`: data parallel, fully sharded data parallel (FSDP)
and tensor parallel, on a 2-D ("data", "model") mesh, in one process or several.

Every batch is split along the mesh's "data" axis. What happens to the params and the optimizer
state is the strategy, chosen by configuration and never written into the model code:
- "dp": a full copy on every device; each device computes the gradient of its slice of the batch
  and the compiler inserts the all-reduce that averages them (the book's DDP, appendix A.9.3);
- "fsdp": every weight split along its "embed" dimension over the "data" axis, so N devices hold
  1/N of the params, gradients and optimizer state each, and XLA gathers a layer's weights when it
  needs them;
- "tp": attention heads, the feed-forward's hidden dimension and the vocabulary split over the
  "model" axis, so each device computes its share of every layer (Megatron's tensor parallel);
- "fsdp+tp": both, on a mesh with data and model axes;
- "ep": a mixture of experts' experts split over the "model" axis (expert parallel).
A family names the logical axes of its params by path (`models.gpt.LOGICAL_AXES`); `RULES` maps
those names onto mesh axes for each strategy, as MaxText's logical axis rules do. A dimension that
does not split evenly over its mesh axis (GPT-2's 50,257-token vocabulary over 2) stays whole.

Whatever the strategy, `jax.jit` computes the same step as on one device (up to the order of
floating-point sums). On a CPU, `jax.config.update("jax_num_cpu_devices", 8)` (before any JAX
call) simulates 8 devices. Several processes (hosts) join with `initialize` first; then each feeds
only its rows of every global batch (`local_rows`, `shard_batch`).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptflax.models import family

RULES = {  # strategy -> {logical axis: mesh axis}; a name not listed is never split
    "dp": {},
    "fsdp": {"embed": "data"},
    "tp": {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"},
    "ep": {"experts": "model"},
}


def parse_strategy(strategy: str) -> dict:
    """The logical-to-mesh axis rules of "dp", "fsdp", "tp", "ep" or a "+"-joined combination."""
    names = strategy.split("+")
    if unknown := [n for n in names if n not in RULES]:
        raise ValueError(
            f"unknown sharding strategy {'+'.join(unknown)!r}: use dp, fsdp, tp, ep or fsdp+tp"
        )
    return {axis: mesh_axis for n in names for axis, mesh_axis in RULES[n].items()}


def parse_mesh(text: str) -> dict[str, int]:
    """'data=4,model=2' -> {"data": 4, "model": 2} (either may be left out)."""
    sizes = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in ("data", "model") or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(
                f"bad mesh {text!r}: write axis sizes as data=N,model=M (positive integers)"
            )
        sizes[name.strip()] = int(size)
    return sizes


def make_mesh(
    batch_size: int | None = None, *, data: int | None = None, model: int = 1, devices=None
) -> Mesh:
    """A ("data", "model") mesh. `data` defaults to as many devices as divide batch_size evenly
    (all that the model axis leaves, when batch_size is None)."""
    devices = list(devices or jax.devices())
    if data is None:
        fits = len(devices) // model
        data = max(
            d for d in range(1, max(fits, 1) + 1) if batch_size is None or batch_size % d == 0
        )
    if data * model > len(devices):
        raise ValueError(
            f"a mesh of data={data},model={model} needs {data * model} devices; "
            f"there are {len(devices)}"
        )
    if batch_size is not None and batch_size % data:
        raise ValueError(f"a batch of {batch_size} rows does not split over data={data} devices")
    return jax.make_mesh(
        (data, model), ("data", "model"), (AxisType.Auto,) * 2, devices=devices[: data * model]
    )


# --- shardings from the params' paths -------------------------------------------------------------


def logical_axes(keys: tuple[str, ...], ndim: int, table: dict) -> tuple:
    """The logical axis names of a leaf of `ndim` axes at dict path `keys` (in the params, or in
    the optimizer state's copies of them). Leaves of the stacked "trf_blocks" get a leading,
    never split, "layers" axis."""
    axes = _layer_axes(tuple(keys), table)
    if "trf_blocks" in keys and ndim == len(axes) + 1:
        axes = ("layers", *axes)
    if len(axes) != ndim:
        raise ValueError(f"{'/'.join(keys)!r} has {ndim} axes; its logical axes are {axes}")
    return axes


def _layer_axes(keys: tuple[str, ...], table: dict) -> tuple:
    """The longest entry of the family's table that ends the path; a bias takes its kernel's
    output axis, LoRA's A (in, r) and B (r, out) their kernel's input and output axes."""
    part = keys[-1]
    if part in ("bias", "A", "B"):
        d_in, d_out = _layer_axes((*keys[:-1], "kernel"), table)
        return {"bias": (d_out,), "A": (d_in, None), "B": (None, d_out)}[part]
    matches = [k for k in table if keys[-len(k.split("/")) :] == tuple(k.split("/"))]
    if not matches:
        raise ValueError(
            f"no logical axes for the params at {'/'.join(keys)!r}: add the path to its "
            "family's LOGICAL_AXES"
        )
    return tuple(table[max(matches, key=lambda k: k.count("/"))])


def partition_spec(axes: tuple, shape: tuple, rules: dict, mesh: Mesh) -> P:
    """Mesh axes for a leaf's dimensions: each logical axis's rule, where the dimension splits
    evenly and the mesh axis is not already used by an earlier dimension."""
    spec, used = [], set()
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = rules.get(name)
        n = mesh.shape.get(mesh_axis, 1)
        split = mesh_axis is not None and n > 1 and size % n == 0 and mesh_axis not in used
        spec.append(mesh_axis if split else None)
        used.add(mesh_axis if split else None)
    return P(*spec)


def shardings(tree, cfg, mesh: Mesh, strategy: str = "dp"):
    """A NamedSharding for every leaf of a params pytree, or of anything holding params (a
    TrainState: its optimizer state mirrors them); leaves outside any dict (step counts) are
    replicated."""
    rules, table = parse_strategy(strategy), family(cfg).LOGICAL_AXES

    def leaf_sharding(path, leaf):
        keys = tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
        shape = np.shape(leaf)
        if not keys or not shape:
            return NamedSharding(mesh, P())
        axes = logical_axes(keys, len(shape), table)
        return NamedSharding(mesh, partition_spec(axes, shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def shard(tree, cfg, mesh: Mesh, strategy: str = "dp"):
    """A copy of the tree placed on the mesh as the strategy says (the tree passed in stays)."""
    return jax.device_put(tree, shardings(tree, cfg, mesh, strategy), may_alias=False)


def init_sharded(init_fn, cfg, mesh: Mesh, strategy: str = "dp"):
    """`init_fn()` (e.g. params and optimizer state) created directly in its shards: no device
    ever holds the whole of a split array."""
    abstract = jax.eval_shape(init_fn)
    return jax.jit(init_fn, out_shardings=shardings(abstract, cfg, mesh, strategy))()


def bytes_per_device(tree, cfg, mesh: Mesh, strategy: str = "dp") -> int:
    """The bytes of the tree's arrays on each device under the strategy (the tree may be
    `jax.eval_shape`'s abstract arrays: nothing is allocated)."""
    total = 0
    for leaf, sharding in zip(
        jax.tree.leaves(tree), jax.tree.leaves(shardings(tree, cfg, mesh, strategy)), strict=True
    ):
        total += math.prod(sharding.shard_shape(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
    return total


def jit_sharded(step_fn, state, cfg, mesh: Mesh, strategy: str = "dp", **jit_options):
    """A copy of `state` placed as the strategy says, and `step_fn(state, ...) -> (state,
    metrics)` jitted to keep the state so placed (the metrics replicated)."""
    state = shard(state, cfg, mesh, strategy)
    placed = (shardings(state, cfg, mesh, strategy), NamedSharding(mesh, P()))
    return state, jax.jit(step_fn, out_shardings=placed, **jit_options)


# --- batches, from one process or several ---------------------------------------------------------


def _check_splits(mesh: Mesh, batch_size: int) -> None:
    n = mesh.shape["data"]
    if batch_size % n:
        raise ValueError(
            f"a batch of {batch_size} rows does not split over {n} devices: use a batch size "
            f"divisible by {n}, or make_mesh(batch_size), which uses fewer devices"
        )


def local_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of every global batch of batch_size that this process feeds (all of them in a
    single process): those its devices hold along the "data" axis."""
    _check_splits(mesh, batch_size)
    sharding = NamedSharding(mesh, P("data"))
    held = {idx[0].indices(batch_size) for idx in sharding.addressable_devices_indices_map(
        (batch_size,)).values()}  # fmt: skip
    start, stop = min(s for s, _, _ in held), max(e for _, e, _ in held)
    if sum(e - s for s, e, _ in held) != stop - start:
        raise ValueError("this process's devices are not neighbours along the mesh's data axis")
    return slice(start, stop)


def shard_batch(batch, mesh: Mesh):
    """Every array of a batch split along its first (batch) axis over the mesh's "data" axis;
    each process passes its own rows (`local_rows`) and gets the global batch."""
    processes = jax.process_count()
    for x in jax.tree.leaves(batch):
        _check_splits(mesh, x.shape[0] * processes)
    sharding = NamedSharding(mesh, P("data"))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int = 300,
) -> None:
    """Join this process to a multi-process run (`jax.distributed.initialize`) before any JAX
    computation, waiting `timeout` seconds for the others. Unset arguments come from
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, else from the cluster (SLURM,
    Open MPI, Cloud TPU), as JAX detects them. CPU devices of different processes talk through
    gloo."""
    env = os.environ.get
    if num_processes is None and env("JAX_NUM_PROCESSES"):
        num_processes = int(env("JAX_NUM_PROCESSES"))
    if process_id is None and env("JAX_PROCESS_ID"):
        process_id = int(env("JAX_PROCESS_ID"))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator, num_processes, process_id, initialization_timeout=timeout
    )
