"""The accelerator benchmark: the 124M train step at context 1024 in fp32, bf16 and bf16 with fused
attention, and its model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from cpu import bench_train
from timing import matmul_gflops

from gptflax.config import GPTConfig

# Dense bf16 peak of the SXM parts, TFLOP/s, from NVIDIA's datasheets: what MFU is measured against.
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def nominal_bf16_tflops(device_kind: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in device_kind), None)


def gpu_report(cfg: GPTConfig, batch: int, repeats: int, n: int) -> dict:
    """The train step in fp32, in bf16, and in bf16 with fused attention (dropout 0 throughout:
    the fused kernel has none), with its model-FLOPs utilisation against the chip's nominal bf16
    peak and against the bf16 matmul throughput measured here at n^3."""
    peak = matmul_gflops(n, dtype=jnp.bfloat16)["jax"]
    kind = jax.devices()[0].device_kind
    nominal = nominal_bf16_tflops(kind)
    cfg = cfg.replace(drop_rate=0.0)
    variants = {"fp32": (cfg, False), "bf16": (cfg, True),
                "bf16 + fused attention": (cfg.replace(fused_attention=True), True)}  # fmt: skip
    rows = []
    for name, (c, bf16) in variants.items():
        print(f"train step: {name}, batch {batch}, context {c.context_length}", flush=True)
        r = bench_train(c, batch, repeats, peak, bf16=bf16, with_torch=False)["gptflax (jax.jit)"]
        achieved = r["model_tflops_per_step"] / r["min_s"]  # TFLOP/s
        r["mfu"] = achieved / nominal if nominal else None
        rows.append({"variant": name, "results": r})
    return {"device_kind": kind, "nominal_bf16_tflops": nominal, "bf16_matmul_gflops": peak,
            "matmul_n": n, "config": f"{cfg.n_layers} layers x {cfg.emb_dim}, context "
            f"{cfg.context_length}", "batch": batch, "train": rows}  # fmt: skip
