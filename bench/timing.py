"""Timing shared by the CPU and GPU benchmarks: interleaved runs, matmul peak, model FLOPs."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from baselines import torch

from gptflax.config import GPT_CONFIG_124M, LLAMA_TINY, SMOLLM2_135M, GPTConfig

SMALL = GPTConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.1)
TINY = SMALL.replace(context_length=64, emb_dim=64, n_layers=2)  # --quick: checks the scripts
M124 = GPT_CONFIG_124M.replace(context_length=256)
SMOL = SMOLLM2_135M.replace(context_length=512)  # the Llama family: trains at context 512
SMOL_TINY = LLAMA_TINY  # --quick

SETTLE_S = 0.5  # pause before each timed call: the other library's idle threads stop spinning


def summary(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def wait(out):
    return jax.block_until_ready(out)


def interleaved(fns: dict, repeats: int) -> dict:
    """Time each callable `repeats` times, alternating between them; the first call of each
    (compilation, warm-up) is timed apart as compile_s, and a second call is not timed: the
    process's heap still grows (page faults) during the first steps."""
    times = {name: [] for name in fns}
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {**summary(t), "compile_s": first[name]} for name, t in times.items()}


def matmul_gflops(n: int, repeats: int = 5, dtype=jnp.float32) -> dict:
    """Matmul throughput of this machine at n^3, for JAX (XLA) and, in fp32 on a CPU, PyTorch."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    fns = {"jax": lambda: wait(mm(a, a))}
    if torch is not None and dtype == jnp.float32 and jax.default_backend() == "cpu":
        t = torch.randn(n, n)
        fns["torch"] = lambda: t @ t
    res = interleaved(fns, repeats)
    return {k: 2 * n**3 / v["min_s"] / 1e9 for k, v in res.items()}


def memory_copy(megabytes: int = 512) -> tuple:
    """A callable that copies a large float32 array, and the bytes each call moves (it reads and
    writes every byte once)."""
    source = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    return (lambda: np.copyto(target, source)), 2 * source.nbytes
