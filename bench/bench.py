"""`make bench`: how fast gptflax trains and generates, beside the book's PyTorch code.

Writes runs/bench/bench.json and runs/bench/bench.md. Every timing is a min and a median over
several runs after a warm-up (the compile time is reported on its own). JAX and PyTorch steps are
interleaved on the same batch, so a load that comes and goes hits both alike. The PyTorch rows
need `make setup-torch` (torch and the book's llms-from-scratch package); without it they are left
out. `--quick` runs small sizes only, to check the script itself. `--gpu` (`make bench-gpu`) is the
accelerator benchmark instead: the speed ladder of the 124M GPT's train step at context 1024
(`gptflax.speed`), the book's model under torch.compile beside it, SmolLM2-135M's step, their
model-FLOPs utilisation and the best rung's stage split (runs/bench/bench_gpu.json and .md).

The pieces: timing.py (interleaved timing, FLOPs), baselines.py (the PyTorch side), stages.py
(the profile's split by model stage), cpu.py, gpu.py, report.py (the markdown tables).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
from cpu import cpu_report
from gpu import PARTS, gpu_report
from report import gpu_markdown, markdown, save
from timing import SMOL_TINY, TINY

from gptflax.config import GPT_CONFIG_124M, SMOLLM2_135M


def gpu_main(args) -> int:
    # Kernels that run inside a CUDA graph are profiled under the graph's name, not their ops':
    # without graphs the stage split can place every kernel (set before the GPU is first used).
    os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")
    if jax.default_backend() == "cpu" and not args.quick:
        raise SystemExit(
            "--gpu found no accelerator: JAX runs on the CPU here. Install jax[cuda12] (or the "
            "TPU build) on a machine with one, or add --quick to check the script on the CPU."
        )
    cfg = TINY if args.quick else GPT_CONFIG_124M  # context 1024, as GPT-2 was trained
    llama_cfg = SMOL_TINY if args.quick else SMOLLM2_135M.replace(context_length=1024)
    rows, micro, n = (4, (2, 4), 512) if args.quick else (args.batch, (16, 32, 64), 8192)
    head = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__}

    def save_gpu(gpu: dict) -> None:
        report = {**head, "gpu": gpu}
        save(report, gpu_markdown(report), Path(args.out), "bench_gpu")

    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--parts: {', '.join(sorted(unknown))}? Pick from {', '.join(PARTS)}")
    gpu_report(cfg, llama_cfg, rows, micro, args.repeats + 1, n, save_gpu, parts)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.md")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small sizes only (checks the script)")
    p.add_argument("--gpu", action="store_true",
                   help="the accelerator benchmark: the speed ladder of the 124M at context 1024, "
                   "MFU (writes bench_gpu.json and bench_gpu.md)")  # fmt: skip
    p.add_argument("--batch", type=int, default=64,
                   help="rows of a --gpu train step, in micro-batches of 16, 32, 64")  # fmt: skip
    p.add_argument(
        "--parts",
        default="ladder,torch,llama",
        help="what --gpu measures: ladder, torch, llama, best (the best settings alone)",
    )
    p.add_argument("--only", default="", metavar="NAME",
                   help="only the models whose name holds NAME, e.g. Qwen3")  # fmt: skip
    p.add_argument("--generate-only", action="store_true", help="the decoding benchmark only")
    args = p.parse_args(argv)
    if args.gpu:
        return gpu_main(args)
    report = cpu_report(args.repeats, args.quick, train=not args.generate_only, only=args.only)
    save(report, markdown(report), Path(args.out), "bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
