"""The accelerator benchmark: the 124M GPT's train step at context 1024 in fp32, bf16 and bf16 with
fused attention, SmolLM2-135M's in fp32 and bf16, their model-FLOPs utilisation (MFU) and where
the bf16 steps' time goes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from cpu import bench_train
from timing import matmul_gflops

from gptflax.config import GPTConfig, LlamaConfig

# Dense bf16 peak of the SXM parts, TFLOP/s, from NVIDIA's datasheets: what MFU is measured against.
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def nominal_bf16_tflops(device_kind: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in device_kind), None)


def gpu_report(cfg: GPTConfig, llama_cfg: LlamaConfig, batch: int, repeats: int, n: int) -> dict:
    """The GPT's train step in fp32, in bf16, and in bf16 with fused attention (dropout 0
    throughout: the fused kernel has none), and the Llama's in fp32 and bf16, each with its
    model-FLOPs utilisation against the chip's nominal bf16 peak and against the bf16 matmul
    throughput measured here at n^3; and the stage split of each bf16 step."""
    peak = matmul_gflops(n, dtype=jnp.bfloat16)["jax"]
    kind = jax.devices()[0].device_kind
    nominal = nominal_bf16_tflops(kind)
    cfg = cfg.replace(drop_rate=0.0)
    fused = cfg.replace(fused_attention=True)
    # SmolLM2's 30 layers keep 30 sets of attention scores: at batch 16 in fp32, 80 GiB
    llama_batch = max(1, batch // 2)
    variants = [("GPT", "fp32", cfg, False, batch), ("GPT", "bf16", cfg, True, batch),
                ("GPT", "bf16 + fused attention", fused, True, batch),
                ("Llama", "fp32", llama_cfg, False, llama_batch),
                ("Llama", "bf16", llama_cfg, True, llama_batch)]  # fmt: skip
    rows, splits = [], []
    for model, name, c, bf16, b in variants:
        print(f"train step: {model} {name}, batch {b}, context {c.context_length}", flush=True)
        res, stages = bench_train(
            c, b, repeats, peak, bf16=bf16, with_torch=False, split=name == "bf16"
        )
        r = res["gptflax (jax.jit)"]
        achieved = r["model_tflops_per_step"] / r["min_s"]  # TFLOP/s
        r["mfu"] = achieved / nominal if nominal else None
        rows.append({"model": model, "variant": name, "batch": b, "results": r})
        if stages:
            splits.append({"config": f"{model} {name}", "batch": b, "stages": stages})
    return {"device_kind": kind, "nominal_bf16_tflops": nominal, "bf16_matmul_gflops": peak,
            "matmul_n": n, "config": f"GPT {cfg.n_layers} layers x {cfg.emb_dim}, Llama "
            f"{llama_cfg.n_layers} layers x {llama_cfg.emb_dim}, context {cfg.context_length}",
            "train": rows, "stages": splits}  # fmt: skip
