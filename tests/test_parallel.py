"""Sharded training on 8 simulated CPU devices: data parallel, FSDP, tensor parallel and FSDP with
tensor parallel give the single-device run's losses and params, for the GPT and Llama families;
sharded checkpoints restore onto other meshes; two processes train as one."""

import os
import socket
import subprocess
import sys
from functools import partial

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from gptflax import checkpoint, files, models, parallel
from gptflax.config import GPT2_PRESETS, LLAMA_TINY
from gptflax.data import DataLoader
from gptflax.lora import init_lora
from gptflax.models import family
from gptflax.training import fit, init_train_state, make_optimizer, resume

pytestmark = [pytest.mark.labA, pytest.mark.lab5]  # lab A's A.9.3; lab 5 trains data parallel

STRATEGIES = [  # (strategy, mesh sizes)
    ("dp", {"data": 8}),
    ("fsdp", {"data": 8}),
    ("tp", {"data": 2, "model": 4}),
    ("fsdp+tp", {"data": 4, "model": 2}),
]


def test_the_simulated_devices_are_there():
    assert len(jax.devices()) == 8  # conftest: jax_num_cpu_devices


def test_meshes_fit_the_batch_and_the_devices():
    assert dict(parallel.make_mesh().shape) == {"data": 8, "model": 1}
    assert parallel.make_mesh(batch_size=6).shape["data"] == 6
    assert parallel.make_mesh(batch_size=6, model=2).shape["data"] == 3
    assert dict(parallel.make_mesh(data=2, model=4).shape) == {"data": 2, "model": 4}
    with pytest.raises(ValueError, match="needs 16 devices; there are 8"):
        parallel.make_mesh(data=4, model=4)
    with pytest.raises(ValueError, match="6 rows does not split over 4 devices"):
        parallel.shard_batch(np.zeros((6, 3)), parallel.make_mesh(data=4))
    assert parallel.parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    for bad in ("data=0", "model=two", "pipeline=2"):
        with pytest.raises(ValueError, match="write axis sizes as data=N,model=M"):
            parallel.parse_mesh(bad)
    with pytest.raises(ValueError, match="unknown sharding strategy 'zero3'"):
        parallel.parse_strategy("fsdp+zero3")


def _spec(tree, path, strategy, mesh, cfg):
    specs = parallel.shardings(tree, cfg, mesh, strategy)
    for key in path.split("/"):
        specs = specs[key]
    return specs.spec


def test_shardings_follow_the_logical_axes(small_cfg):
    params = jax.eval_shape(lambda: models.init_params(jax.random.key(0), small_cfg))
    mesh = parallel.make_mesh(data=4, model=2)
    spec = partial(_spec, params, mesh=mesh, cfg=small_cfg)
    layers = "trf_blocks/att/W_query"  # (L, D, H * Dh)
    assert spec(f"{layers}/kernel", "dp") == P(None, None, None)
    assert spec(f"{layers}/kernel", "fsdp") == P(None, "data", None)
    assert spec(f"{layers}/kernel", "tp") == P(None, None, "model")
    assert spec(f"{layers}/kernel", "fsdp+tp") == P(None, "data", "model")
    assert spec("trf_blocks/ff/fc1/bias", "fsdp+tp") == P(None, "model")  # its kernel's output
    assert spec("trf_blocks/ff/fc2/kernel", "fsdp+tp") == P(None, "model", "data")  # (L, 4D, D)
    assert spec("trf_blocks/norm1/scale", "fsdp+tp") == P(None, "data")
    assert spec("tok_emb/embedding", "fsdp+tp") == P(None, "data")  # 97 rows do not split in 2
    assert spec("out_head/kernel", "fsdp+tp") == P("data", None)
    wide = jax.eval_shape(
        lambda: models.init_params(jax.random.key(0), small_cfg.replace(vocab_size=98))
    )
    assert _spec(wide, "tok_emb/embedding", "tp", mesh, small_cfg) == P("model", None)
    lora = jax.eval_shape(lambda: init_lora(jax.random.key(0), params, rank=2))
    assert _spec(lora, "trf_blocks/ff/fc1/A", "fsdp+tp", mesh, small_cfg) == P(None, "data", None)
    assert _spec(lora, "trf_blocks/ff/fc1/B", "fsdp+tp", mesh, small_cfg) == P(None, None, "model")

    llama_params = jax.eval_shape(lambda: models.init_params(jax.random.key(0), LLAMA_TINY))
    assert _spec(llama_params, "trf_blocks/att/W_key/kernel", "tp", mesh, LLAMA_TINY) == P(
        None, None, "model"
    )  # (L, D, G * Dh): the key/value heads
    assert _spec(llama_params, "trf_blocks/ff/fc3/kernel", "fsdp", mesh, LLAMA_TINY) == P(
        None, None, "data"
    )
    with pytest.raises(ValueError, match="no logical axes for the params at 'adapter/kernel'"):
        parallel.shardings({"adapter": {"kernel": np.zeros((2, 2))}}, small_cfg, mesh)


def test_fsdp_holds_an_eighth_of_what_data_parallel_holds():
    cfg = GPT2_PRESETS["124M"]
    tx = make_optimizer()
    state = jax.eval_shape(lambda: init_train_state(models.init_params(jax.random.key(0), cfg), tx))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    dp = parallel.bytes_per_device(state, cfg, parallel.make_mesh(), "dp")
    fsdp = parallel.bytes_per_device(state, cfg, parallel.make_mesh(), "fsdp")
    assert dp == 3 * 4 * n_params + 4 + 4  # params, Adam's mu and nu; step and Adam's count
    # Every weight but the feed-forward's first bias (4D,) has an "embed" axis, of 768 = 8 * 96.
    whole = cfg.n_layers * 4 * cfg.emb_dim
    assert fsdp == 3 * 4 * ((n_params - whole) / 8 + whole) + 8
    assert fsdp < dp / 7.9


# AdamW with eps 1e-5 (the book's is 1e-8): a gradient that is zero but for rounding, whose sign
# then depends on the order of the sums across devices, would otherwise make a full step of lr.
TX = optax.adamw(1e-3, eps=1e-5, weight_decay=0.1)


def _state(cfg):
    return init_train_state(family(cfg).init_params(jax.random.key(0), cfg), TX)


def _train(cfg, strategy, sizes, state=None, num_epochs=2, **options):
    """Two steps per epoch on random tokens: on one device (strategy None) or on a mesh."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (16, 16), dtype=np.int32)
    loader = DataLoader(x, np.roll(x, -1, axis=1), batch_size=8, shuffle=True)
    mesh = None if strategy is None else parallel.make_mesh(8, **sizes)
    return fit(
        _state(cfg) if state is None else state, loader, loader, cfg, TX,
        num_epochs=num_epochs, key=jax.random.key(1), eval_freq=1, eval_iter=2, mesh=mesh,
        strategy=strategy or "dp", **options,
    )  # fmt: skip


CONFIGS = {  # the GPT with dropout: each device draws the same dropout masks as one device
    "gpt": lambda small: small.replace(drop_rate=0.1),
    "llama": lambda small: LLAMA_TINY,
}


@pytest.mark.parametrize("model", CONFIGS)
def test_every_strategy_gives_the_single_device_losses_and_params(small_cfg, model):
    cfg = CONFIGS[model](small_cfg)
    single, single_history = _train(cfg, None, {})
    for strategy, sizes in STRATEGIES:
        state, history = _train(cfg, strategy, sizes)
        np.testing.assert_allclose(history.train_losses, single_history.train_losses, rtol=1e-5)
        np.testing.assert_allclose(history.val_losses, single_history.val_losses, rtol=1e-5)
        check = partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6, err_msg=strategy)
        jax.tree.map(check, state.params, single.params)
        kernel = state.params["trf_blocks"]["att"]["W_query"]["kernel"]  # (L, D, H * Dh)
        split = {"dp": 1, "fsdp": 8, "tp": 4, "fsdp+tp": 8}[strategy]  # devices holding a part
        assert np.prod(kernel.sharding.shard_shape(kernel.shape)) * split == kernel.size


def test_a_sharded_checkpoint_resumes_bit_exactly_and_restores_onto_other_meshes(
    small_cfg, tmp_path
):
    cfg = small_cfg.replace(drop_rate=0.1)
    whole, _ = _train(cfg, "fsdp", {}, num_epochs=2)
    _train(cfg, "fsdp", {}, num_epochs=1, checkpoint_dir=tmp_path)
    kernel = lambda s: s.params["trf_blocks"]["ff"]["fc1"]["kernel"]  # noqa: E731
    like = _state(cfg)
    fsdp = parallel.shard(like, cfg, parallel.make_mesh(), "fsdp")
    state, history = resume(tmp_path, fsdp, cfg)
    assert kernel(state).sharding.spec == kernel(fsdp).sharding.spec == P(None, "data", None)
    resumed, _ = _train(cfg, "fsdp", {}, state=state, history=history)
    jax.tree.map(np.testing.assert_array_equal, resumed, whole)  # as if never stopped

    tp = parallel.shard(like, cfg, parallel.make_mesh(data=2, model=4), "tp")
    on_tp, _ = resume(tmp_path, tp, cfg)
    assert kernel(on_tp).sharding.spec == P(None, None, "model")
    _, on_one = checkpoint.load_model(tmp_path)  # 8 devices to 1: generation on a laptop
    assert jax.tree.leaves(on_one)[0].sharding.device_set == {jax.devices()[0]}
    jax.tree.map(np.testing.assert_array_equal, on_tp.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, on_one, state.params)


def test_local_rows_are_the_whole_batch_in_one_process():
    assert parallel.local_rows(parallel.make_mesh(data=4, model=2), 12) == slice(0, 12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cli_train(run_dir, text, *options, processes=1, environment=False):
    """`python -m gptflax train` with FSDP over 4 CPU devices: in one process, or in
    `processes` processes of 4 / processes devices each, joined through a coordinator named by
    options, or with `environment` by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID and --distributed."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(4 // processes)}
    command = [
        sys.executable, "-m", "gptflax", "train", str(text), "--model", "tiny",
        "--context-length", "32", "--batch-size", "4", "--strategy", "fsdp", "--eval-freq", "2",
        "--eval-iter", "2", "--run-dir", str(run_dir), *options,
    ]  # fmt: skip
    address = f"localhost:{_free_port()}"

    def joining(i: int) -> tuple[list, dict]:  # how process i finds the others
        if environment:
            variables = {"JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(i)}
            return ["--distributed"], {"JAX_COORDINATOR_ADDRESS": address, **variables}
        flags = ["--coordinator", address, "--num-processes", str(processes)]
        return [*flags, "--process-id", str(i)], {}

    joins = [joining(i) for i in range(processes)] if processes > 1 else [([], {})]
    runs = [
        subprocess.Popen(command + flags, env={**env, **variables}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for flags, variables in joins
    ]  # fmt: skip
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), "\n\n".join(outputs)
    return outputs


def test_two_processes_train_as_one_and_resume_from_their_shards(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(files.resolve("the-verdict.txt").read_text(encoding="utf-8")[:5000])
    _cli_train(tmp_path / "one", text, "--epochs", "2")
    _cli_train(tmp_path / "two", text, "--epochs", "1", processes=2)  # each writes its shards
    out = _cli_train(
        tmp_path / "two", text, "--epochs", "2", "--resume", processes=2, environment=True
    )
    assert "in 2 process(es)" in out[0] and "resuming at step 8: epoch 2, batch 1" in out[1]
    one, two = (tmp_path / name / "checkpoints" for name in ("one", "two"))
    h1, h2 = (checkpoint.read_meta(d)[1]["history"] for d in (one, two))
    assert h2["steps"] == h1["steps"] and len(h1["steps"]) > 4
    np.testing.assert_allclose(h2["train_losses"], h1["train_losses"], rtol=1e-5)
    np.testing.assert_allclose(h2["val_losses"], h1["val_losses"], rtol=1e-5)
    (_, p1), (_, p2) = checkpoint.load_model(one), checkpoint.load_model(two)
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), p2, p1)
