"""Data parallelism with `jax.sharding`: a one-axis mesh over the devices, every batch split along
it, the params and optimizer state replicated. `jax.jit` does the rest: each device computes the
gradient of its slice and the compiler inserts the all-reduce that averages them, so a step gives
the same loss and params as on one device (up to the order of floating-point sums).

On a CPU, `jax.config.update("jax_num_cpu_devices", 4)` (before any JAX call) simulates 4 devices.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh(batch_size: int | None = None, devices=None) -> Mesh:
    """A ("data",) mesh over as many devices as divide batch_size evenly (all when None)."""
    devices = list(devices or jax.devices())
    n = len(devices)
    if batch_size is not None:
        n = max(d for d in range(1, n + 1) if batch_size % d == 0)
    return jax.make_mesh((n,), ("data",), (AxisType.Auto,), devices=devices[:n])


def replicate(tree, mesh: Mesh):
    """A full copy of every leaf on every device of the mesh (params, optimizer state, keys)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch, mesh: Mesh):
    """Split every array of the batch along its first (batch) axis across the mesh."""
    n = mesh.shape["data"]
    for x in jax.tree.leaves(batch):
        if x.shape[0] % n:
            raise ValueError(
                f"a batch of {x.shape[0]} rows does not split over {n} devices: use a batch size "
                f"divisible by {n}, or data_mesh(batch_size), which uses fewer devices"
            )
    return jax.device_put(batch, NamedSharding(mesh, P("data")))
