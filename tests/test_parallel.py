"""Data parallelism on 4 simulated CPU devices: the same loss and params as one device."""

from functools import partial

import jax
import numpy as np
import pytest

from gptflax import gpt, parallel
from gptflax.data import DataLoader
from gptflax.losses import loss_fn
from gptflax.train import fit, init_train_state, make_optimizer, train_step

pytestmark = pytest.mark.lab5


def test_the_simulated_devices_are_there():
    assert len(jax.devices()) == 4  # conftest: jax_num_cpu_devices


def test_mesh_uses_the_devices_that_divide_the_batch():
    assert parallel.data_mesh().shape["data"] == 4
    assert parallel.data_mesh(batch_size=8).shape["data"] == 4
    assert parallel.data_mesh(batch_size=6).shape["data"] == 3
    assert parallel.data_mesh(batch_size=1).shape["data"] == 1


def test_a_batch_that_does_not_split_is_a_clear_error():
    with pytest.raises(ValueError, match="6 rows does not split over 4 devices"):
        parallel.shard_batch(np.zeros((6, 3)), parallel.data_mesh())


@pytest.mark.parametrize("drop_rate", [0.0, 0.1])
def test_sharded_steps_equal_single_device_steps(small_cfg, drop_rate):
    cfg = small_cfg.replace(drop_rate=drop_rate)
    tx = make_optimizer(1e-3, weight_decay=0.1)
    step = jax.jit(partial(train_step, loss=partial(loss_fn, cfg=cfg), tx=tx))
    rng = np.random.default_rng(0)
    batches = [tuple(rng.integers(0, 97, (8, 16), dtype=np.int32) for _ in "xy") for _ in "ab"]
    key = jax.random.key(1)

    def run(mesh):
        state = init_train_state(gpt.init_params(jax.random.key(0), cfg), tx)
        if mesh is not None:
            state = parallel.replicate(state, mesh)
        losses = []
        for batch in batches:
            if mesh is not None:
                batch = parallel.shard_batch(batch, mesh)
                assert {s.data.shape for s in batch[0].addressable_shards} == {(2, 16)}
            state, metrics = step(state, batch, key)
            losses.append(float(metrics["loss"]))
        return state, losses

    single, single_losses = run(None)
    sharded, sharded_losses = run(parallel.data_mesh())
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-6)
    # Gradients are summed in another order across devices; Adam divides by sqrt(nu), which can
    # magnify a last-bit difference of a near-zero gradient. 1e-6 is 0.1% of one step (lr 1e-3).
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), sharded, single)
    leaf = jax.tree.leaves(sharded.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4


def test_fit_trains_data_parallel(small_cfg):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 97, (32, 16), dtype=np.int32)
    loader = DataLoader(x, np.roll(x, -1, axis=1), batch_size=8)
    tx = make_optimizer(1e-2)
    state = init_train_state(gpt.init_params(jax.random.key(0), small_cfg), tx)
    state, history = fit(
        state, loader, loader, small_cfg, tx, num_epochs=3, key=jax.random.key(0),
        eval_freq=4, eval_iter=4, mesh=parallel.data_mesh(8),
    )  # fmt: skip
    assert history.train_losses[-1] < history.train_losses[0] - 0.5
    assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == 4
