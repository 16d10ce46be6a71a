"""The CPU benchmark: train steps and decoding beside the book's PyTorch code; NNX vs functional."""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from baselines import starting_models, torch, torch_generators, torch_train_step, with_sdpa
from flax import nnx
from stages import stage_split
from timing import (
    M124,
    SMALL,
    SMOL,
    SMOL_TINY,
    TINY,
    interleaved,
    matmul_gflops,
    memory_copy,
    wait,
)

from gptflax import models
from gptflax.config import QWEN3_0_6B, QWEN3_TINY, GPTConfig
from gptflax.decoding import decoding_params
from gptflax.generate import generate
from gptflax.losses import cross_entropy, loss_fn, mixed_precision
from gptflax.nnx_model import from_params
from gptflax.speed import matmul_weights, train_flops
from gptflax.training import init_train_state, make_optimizer, train_step

# glibc settings the Makefile exports (see there): without them every XLA step page-faults its
# scratch memory in again, and JAX's times here come out 15-35% slower; without huge pages
# (GLIBC_TUNABLES) batch-1 decoding runs about 6% slower.
MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def bench_train(
    cfg, batch: int, repeats: int, peak: float, bf16=False, with_torch=True, split=False
):
    """One AdamW step (tokens/s, share of the matmul peak `peak` in GFLOP/s), with the book's;
    and with `split`, where the step's time goes (`stages.stage_split`), else None."""
    tm, params = starting_models(cfg, with_torch)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (batch, cfg.context_length), dtype=np.int32)
    y = np.roll(x, -1, axis=1)
    tx = make_optimizer(4e-4, weight_decay=0.1)
    loss = partial(loss_fn, cfg=cfg)
    step = jax.jit(partial(train_step, loss=mixed_precision(loss) if bf16 else loss, tx=tx),
                   donate_argnums=0)  # fmt: skip
    state = [init_train_state(jax.tree.map(jnp.copy, params), tx)]  # donated: own arrays
    key = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = step.lower(state[0], (x, y), key).compile()  # one executable, timed and profiled
    compile_s = time.perf_counter() - t0

    def jax_step():
        state[0], metrics = compiled(state[0], (x, y), key)
        wait(metrics["loss"])

    fns = {"gptflax (jax.jit)": jax_step}
    if tm is not None and not bf16:
        fns["book PyTorch"] = torch_train_step(tm, x, y)
        if isinstance(cfg, GPTConfig):
            fns["PyTorch + SDPA"] = torch_train_step(with_sdpa(tm), x, y)
    res = interleaved(fns, repeats)
    res["gptflax (jax.jit)"]["compile_s"] += compile_s  # interleaved timed its first run only
    flops = train_flops(cfg, batch, cfg.context_length)
    for r in res.values():
        r["tokens_per_s"] = batch * cfg.context_length / r["min_s"]
        r["model_tflops_per_step"] = flops / 1e12
        r["share_of_matmul_peak"] = flops / r["min_s"] / 1e9 / peak
    ours = res["gptflax (jax.jit)"]
    for name, ratio in (("book PyTorch", "speedup_vs_book"), ("PyTorch + SDPA", "speedup_vs_sdpa")):
        if name in res:
            res[ratio] = res[name]["min_s"] / ours["min_s"]
            res[f"{ratio}_median"] = res[name]["median_s"] / ours["median_s"]
    stages = stage_split(compiled, jax_step) if split else None
    return res, stages


def bench_nnx(cfg: GPTConfig, batch: int, repeats: int) -> dict:
    """One AdamW step three ways, eval mode (no dropout): functional, nnx.jit, split/merge."""
    cfg = cfg.replace(drop_rate=0.0)
    params = models.init_params(jax.random.key(0), cfg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.context_length), dtype=np.int32))
    y = jnp.roll(x, -1, axis=1)
    tx = optax.adamw(4e-4, weight_decay=0.1)
    step = jax.jit(partial(train_step, loss=partial(loss_fn, cfg=cfg), tx=tx), donate_argnums=0)
    state = [init_train_state(jax.tree.map(jnp.copy, params), tx)]  # donated: own arrays

    def functional():
        state[0], m = step(state[0], (x, y), jax.random.key(0))
        wait(m["loss"])

    def nnx_loss(m):
        return cross_entropy(m(x), y)  # the same loss as the functional step

    def nnx_train(m, opt):
        value, grads = nnx.value_and_grad(nnx_loss)(m)
        opt.update(m, grads)
        return value

    twin = from_params(cfg, params)
    optimizer = nnx.Optimizer(twin, tx, wrt=nnx.Param)
    nnx_step = nnx.jit(nnx_train)
    other = from_params(cfg, params)  # its own arrays: split/merge donates them
    graphdef, nnx_state = nnx.split((other, nnx.Optimizer(other, tx, wrt=nnx.Param)))
    holder = [nnx_state]

    @partial(jax.jit, donate_argnums=0)
    def split_merge_step(s):
        m, opt = nnx.merge(graphdef, s)
        value = nnx_train(m, opt)
        return nnx.state((m, opt)), value

    def merged():
        holder[0], value = split_merge_step(holder[0])
        wait(value)

    fns = {
        "functional jax.jit": functional,
        "NNX nnx.jit": lambda: wait(nnx_step(twin, optimizer)),
        "NNX split/merge under jax.jit": merged,
    }
    return interleaved(fns, repeats)


def bench_generate(cfg, new_tokens: int, repeats: int, batch: int, uncached: bool) -> tuple:
    """Greedy tokens/s (all rows together) from `batch` copies of a 4-token prompt; with
    `uncached`, also the loops without a cache (slow: their point is made at batch 1). The KV
    cache decodes from `decoding_params`, laid out once per model (its time is `layout_s`).
    Returns the results and the memory bandwidth, GB/s, of copies timed between the runs: this
    VM's bandwidth drifts by 10% and more between minutes, so a decoder's share of its limit is
    taken against the bandwidth of the same minutes."""
    cfg = cfg.replace(drop_rate=0.0) if isinstance(cfg, GPTConfig) else cfg
    tm, params = starting_models(cfg)
    prompt = np.tile([[6109, 3626, 6100, 345]], (batch, 1)) % cfg.vocab_size  # "Every effort.."
    prompt = prompt.astype(np.int32)  # GPT-2's ids; any ids in a smaller vocabulary
    layout_s = time.perf_counter()
    laid_out = jax.block_until_ready(decoding_params(params))  # once, as for a chat session
    layout_s = time.perf_counter() - layout_s
    fns = {"gptflax, KV cache": lambda: generate(laid_out, prompt, new_tokens, cfg)}
    if uncached:
        fns["gptflax, no cache"] = lambda: generate(
            params, prompt, new_tokens, cfg, use_cache=False
        )
    if tm is not None:
        torch_fns = torch_generators(tm, prompt, new_tokens, cfg)
        if not uncached:
            del torch_fns["book PyTorch, naive loop"]
        fns = {**torch_fns, **fns}
    copy, moved = memory_copy()
    res = interleaved({**fns, "memory copy": copy}, repeats)
    gbps = moved / res.pop("memory copy")["min_s"] / 1e9
    for r in res.values():
        r["tokens_per_s"] = batch * new_tokens / r["min_s"]
    res["gptflax, KV cache"]["layout_s"] = layout_s
    return res, gbps


def decoding_limit(cfg, batch: int, gbps: float) -> float:
    """Tokens/s at which decoding would only read memory: each step reads every weight a token
    is multiplied by once (float32; the embeddings only at one row) and yields `batch` tokens.
    The KV cache and activations are left out (smaller)."""
    return batch * gbps * 1e9 / (4 * matmul_weights(cfg))


def in_own_process(fn, *args):
    """fn(*args) in a fresh process: under the Makefile's malloc settings glibc keeps the memory a
    case frees, so cases run one after another in one process added up (the whole run was killed
    at 24 GiB). Returns fn's result, or None if that process died (killed for memory, say)."""
    context = multiprocessing.get_context("forkserver")  # forks a server that ran no JAX yet
    context.set_forkserver_preload(["cpu"])  # which imported jax, torch and this file once
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(_with_torch_threads, fn, *args).result()
        except BrokenProcessPool:
            return None


def _with_torch_threads(fn, *args):
    """fn(*args) with PyTorch on every core, as XLA is."""
    if torch is not None:
        torch.set_num_threads(os.cpu_count())
    return fn(*args)


def train_rows(cfg, name: str, batch: int, bf16: bool, repeats: int, peak: float) -> list:
    """The report's train rows for one case: fp32 beside the book's, and bf16 alone."""
    row = {"config": name, "context": cfg.context_length, "batch": batch}
    rows = [{**row, "results": bench_train(cfg, batch, repeats, peak)[0]}]
    if bf16:
        r = bench_train(cfg, batch, repeats, peak, bf16=True)[0]["gptflax (jax.jit)"]
        rows.append({**row, "results": {"gptflax bf16 (jax.jit)": r}})
    return rows


def split_row(cfg, name: str, batch: int, peak: float) -> dict:
    """The stage split of one case's fp32 step, profiled without the PyTorch model beside it
    (SmolLM2's step at batch 4 and the book's model came to 19 GB before the profile)."""
    stages = bench_train(cfg, batch, 1, peak, with_torch=False, split=True)[1]
    return {"config": name, "context": cfg.context_length, "batch": batch, "stages": stages}


def cpu_report(repeats: int, quick: bool, train: bool = True, only: str = "") -> dict:
    """Every CPU measurement, as the report bench.json holds; decoding only without `train`, and
    only the models whose name holds `only`. Each case runs in a process of its own
    (`in_own_process`)."""
    load_before = os.getloadavg()[0]
    n = 512 if quick else 4096
    peak_by = _with_torch_threads(matmul_gflops, n)
    peak = max(peak_by.values())
    # (config, name, batch, also in bf16, with the stage split)
    # (config, name, new tokens): the Qwen3 beside the book's batched KV cache (kv_cache_batched)
    if quick:
        # (the Qwen3 decodes through the Llama's code, so the quick run decodes no Llama)
        train_cases = [(TINY, "GPT tiny", 2, True, True), (SMOL_TINY, "Llama tiny", 2, False, True)]
        nnx_cases = [(TINY, "tiny", 2)]
        gen_cases = [(TINY, "GPT tiny", 20), (QWEN3_TINY, "Qwen3 tiny", 20)]
    else:
        # SmolLM2 at batch 8 with the book's Llama3Model beside it takes over 24 GiB (killed)
        train_cases = [
            (SMALL, "GPT small (4x256)", 8, True, False), (M124, "GPT-2 124M", 2, True, False),
            (M124, "GPT-2 124M", 8, True, True), (SMOL, "SmolLM2-135M", 4, False, True),
        ]  # fmt: skip
        nnx_cases = [(SMALL, "small (4x256)", 8), (M124, "124M", 2)]
        gen_cases = [(M124, "GPT-2 124M", 200), (SMOL, "SmolLM2-135M", 200),
                     (QWEN3_0_6B, "Qwen3-0.6B (random weights)", 32)]  # fmt: skip
    if not train:
        train_cases = nnx_cases = []
    train_cases, nnx_cases, gen_cases = (
        [c for c in cases if only in c[1]] for cases in (train_cases, nnx_cases, gen_cases)
    )
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "matmul_n": n,
        "matmul_gflops": peak_by,
        "train": [],
        "stages": [],
        "nnx": [],
        "left_out": [],
    }

    def run(case: str, fn, *args):
        print(case, flush=True)
        if (out := in_own_process(fn, *args)) is None:
            print("  its process died (out of memory?): left out of the report", flush=True)
            report["left_out"].append(case)
        return out

    for cfg, name, batch, bf16, split in train_cases:
        case = f"train step: {name}, context {cfg.context_length}, batch {batch}"
        report["train"] += run(case, train_rows, cfg, name, batch, bf16, repeats, peak) or []
        if split and (row := run(f"{case}, stage split", split_row, cfg, name, batch, peak)):
            report["stages"].append(row)
    for cfg, name, batch in nnx_cases:
        if res := run(f"functional vs NNX: {name}, batch {batch}", bench_nnx, cfg, batch, repeats):
            report["nnx"].append({"config": name, "batch": batch, "results": res})
    report["generate"] = []
    for cfg, name, new_tokens in gen_cases:
        for batch in (1, 8):
            uncached = isinstance(cfg, GPTConfig) and batch == 1  # the uncached loop: GPT, once
            args = (cfg, new_tokens, max(2, repeats // 2), batch, uncached)
            if out := run(f"generation: {name}, batch {batch}", bench_generate, *args):
                res, gbps = out
                report["generate"].append({
                    "config": name,
                    "batch": batch,
                    "new_tokens": new_tokens,
                    "memory_gbps": gbps,
                    "bandwidth_limit_tokens_per_s": decoding_limit(cfg, batch, gbps),
                    "results": res,
                })  # fmt: skip
    report["load_before"], report["load_after"] = load_before, os.getloadavg()[0]
    report["loaded"] = load_before > 0.5  # the load after is mostly this benchmark's own
    return report
