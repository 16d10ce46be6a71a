"""`make bench`: how fast gptflax trains and generates, beside the book's PyTorch code.

Writes runs/bench/bench.json and runs/bench/bench.md. Every timing is a min and a median over
several runs after a warm-up (the compile time is reported on its own). JAX and PyTorch steps are
interleaved on the same batch, so a load that comes and goes hits both alike. The PyTorch rows
need `make setup-torch` (torch and the book's llms-from-scratch package); without it they are left
out. `--quick` runs small sizes only, to check the script itself. `--gpu` (`make bench-gpu`) is the
accelerator benchmark instead: the 124M train step at context 1024 in fp32, bf16 and bf16 with
fused attention, and its model-FLOPs utilisation (runs/bench/bench_gpu.json and bench_gpu.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptflax import gpt
from gptflax.config import GPT_CONFIG_124M, GPTConfig
from gptflax.generate import generate
from gptflax.losses import cross_entropy, loss_fn, mixed_precision
from gptflax.nnx_model import from_params
from gptflax.train import init_train_state, make_optimizer, train_step
from gptflax.weights import from_book_state_dict

try:
    import torch
    from llms_from_scratch import ch04 as book
except ImportError:  # the PyTorch comparison is optional
    torch = None

SMALL = GPTConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.1)
M124 = GPT_CONFIG_124M.replace(context_length=256)


SETTLE_S = 0.5  # pause before each timed call: the other library's idle threads stop spinning
# glibc settings the Makefile exports (see there): without them every XLA step page-faults its
# scratch memory in again, and JAX's times here come out 15-35% slower.
MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


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


def train_flops(cfg: GPTConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward): 2 per multiply-add
    of every weight matrix per token, plus the attention scores and weighted sums."""
    d, layers = cfg.emb_dim, cfg.n_layers
    matmul_params = layers * 12 * d * d + d * cfg.vocab_size  # qkv+out 4d^2, MLP 8d^2, head
    attention = layers * 2 * 2 * seq * d  # QK^T and AV, per token (full, not causal-halved)
    return 3 * 2 * batch * seq * (matmul_params + attention / 2)


def starting_models(cfg: GPTConfig, with_torch: bool = True):
    """(the book's PyTorch GPTModel or None, our params with the same weights)."""
    if torch is None or not with_torch:
        return None, gpt.init_params(jax.random.key(0), cfg)
    torch.manual_seed(123)
    book_model = book.GPTModel(dataclasses.asdict(cfg))
    state = {k: v.detach().numpy() for k, v in book_model.state_dict().items()}
    return book_model, from_book_state_dict(state, cfg)


def bench_train(
    cfg: GPTConfig, batch: int, repeats: int, peak: float, bf16=False, with_torch=True
) -> dict:
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

    def jax_step():
        state[0], metrics = step(state[0], (x, y), key)
        wait(metrics["loss"])

    fns = {"gptflax (jax.jit)": jax_step}
    if tm is not None and not bf16:
        tm.train()
        opt = torch.optim.AdamW(tm.parameters(), lr=4e-4, weight_decay=0.1)
        tx_, ty_ = torch.from_numpy(x).long(), torch.from_numpy(y).long()

        def torch_step():
            opt.zero_grad()
            logits = tm(tx_)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ty_.flatten()).backward()
            opt.step()

        fns["book PyTorch"] = torch_step
    res = interleaved(fns, repeats)
    flops = train_flops(cfg, batch, cfg.context_length)
    for r in res.values():
        r["tokens_per_s"] = batch * cfg.context_length / r["min_s"]
        r["model_tflops_per_step"] = flops / 1e12
        r["share_of_matmul_peak"] = flops / r["min_s"] / 1e9 / peak
    if "book PyTorch" in res:
        res["speedup_vs_book"] = res["book PyTorch"]["min_s"] / res["gptflax (jax.jit)"]["min_s"]
        res["speedup_vs_book_median"] = (
            res["book PyTorch"]["median_s"] / res["gptflax (jax.jit)"]["median_s"]
        )
    return res


def bench_nnx(cfg: GPTConfig, batch: int, repeats: int) -> dict:
    """One AdamW step three ways, eval mode (no dropout): functional, nnx.jit, split/merge."""
    cfg = cfg.replace(drop_rate=0.0)
    params = gpt.init_params(jax.random.key(0), cfg)
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


def torch_kv_generate(m, idx, new_tokens: int):
    """Greedy decoding with a KV cache, in PyTorch, over the layers of the book's GPTModel: the
    baseline for ours. (llms-from-scratch 1.0.19's kv_cache.gpt2 fails on one-token steps: its
    causal mask slices the wrong axis.)"""
    caches = [None] * len(m.trf_blocks)

    def run(tokens, start):
        x = m.tok_emb(tokens) + m.pos_emb(torch.arange(start, start + tokens.shape[1]))
        for i, blk in enumerate(m.trf_blocks):
            att, h = blk.att, blk.norm1(x)
            b, t, _ = h.shape
            q, k, v = (
                w(h).view(b, t, att.num_heads, att.head_dim).transpose(1, 2)
                for w in (att.W_query, att.W_key, att.W_value)
            )
            if caches[i] is not None:
                k, v = torch.cat([caches[i][0], k], 2), torch.cat([caches[i][1], v], 2)
            caches[i] = (k, v)
            context = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
            x = x + att.out_proj(context.transpose(1, 2).reshape(b, t, -1))
            x = x + blk.ff(blk.norm2(x))
        return m.out_head(m.final_norm(x[:, -1]))

    logits, start = run(idx, 0), idx.shape[1]
    for i in range(new_tokens):
        next_idx = logits.argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, next_idx], dim=1)
        logits = run(next_idx, start + i)
    return idx


def bench_generate(cfg: GPTConfig, new_tokens: int, repeats: int) -> dict:
    """Greedy tokens/s at batch 1 from a 4-token prompt."""
    cfg = cfg.replace(drop_rate=0.0)
    tm, params = starting_models(cfg)
    prompt = np.array([[6109, 3626, 6100, 345]], dtype=np.int32)  # "Every effort moves you"
    ctx = cfg.context_length
    fns = {
        "gptflax, no cache": lambda: generate(params, prompt, new_tokens, cfg, use_cache=False),
        "gptflax, KV cache": lambda: generate(params, prompt, new_tokens, cfg),
    }
    if tm is not None:
        tm.eval()
        tp = torch.from_numpy(prompt).long()

        def naive():
            with torch.no_grad():
                book.generate_text_simple(tm, tp, new_tokens, ctx)

        def kv_cached():
            with torch.no_grad():
                torch_kv_generate(tm, tp, new_tokens)

        fns = {"book PyTorch, naive loop": naive, "book PyTorch, KV cache": kv_cached, **fns}
    res = interleaved(fns, repeats)
    for r in res.values():
        r["tokens_per_s"] = new_tokens / r["min_s"]
    return res


# Dense bf16 peak of the SXM parts, TFLOP/s, from NVIDIA's datasheets: what MFU is measured against.
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def nominal_bf16_tflops(device_kind: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in device_kind), None)


def gpu_report(cfg: GPTConfig, batch: int, repeats: int, n: int) -> dict:
    """The accelerator benchmark: the train step in fp32, in bf16, and in bf16 with fused
    attention (dropout 0 throughout: the fused kernel has none), with its model-FLOPs utilisation
    against the chip's nominal bf16 peak and against the bf16 matmul throughput measured here."""
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


def gpu_markdown(report: dict) -> str:
    g = report["gpu"]
    nominal = g["nominal_bf16_tflops"]
    lines = [
        f"# gptflax on an accelerator ({report['date']}, {g['device_kind']}, jax {report['jax']})",
        "",
        f"bf16 matmul throughput measured at {g['matmul_n']}^3: "
        f"{g['bf16_matmul_gflops'] / 1e3:.0f} TFLOP/s; nominal dense bf16 peak: "
        + (f"{nominal:.0f} TFLOP/s" if nominal else "unknown for this device"),
        "",
        f"## Train step, {g['config']}, batch {g['batch']} (AdamW, no dropout)",
        "",
        "| variant | compile s | min s | median s | tokens/s | model TFLOP/s | MFU "
        "| share of measured matmul peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in g["train"]:
        r = row["results"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {row['variant']} | {r['compile_s']:.1f} | {r['min_s']:.4f} | {r['median_s']:.4f} "
            f"| {r['tokens_per_s']:,.0f} | {r['model_tflops_per_step'] / r['min_s']:.1f} | {mfu} "
            f"| {r['share_of_matmul_peak']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    lines = [
        f"# gptflax benchmarks ({report['date']}, {report['device']})",
        "",
        f"fp32 matmul throughput at {report['matmul_n']}^3: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_gflops"].items()),
        f"load average before / after: {report['load_before']:.2f} / {report['load_after']:.2f} "
        f"on {report['cpus']} CPUs{' (the machine looked loaded)' if report['loaded'] else ''}",
        "glibc malloc: "
        + ", ".join(f"{k}={v}" for k, v in report["malloc_env"].items() if v is not None)
        if any(report["malloc_env"].values())
        else "glibc malloc: defaults (run through `make bench` for the settings the Makefile sets)",
        "",
        "## Train step (AdamW, dropout 0.1)",
        "",
        "| config | batch | implementation | compile s | min s | median s | tokens/s "
        "| share of matmul peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["train"]:
        for name, r in row["results"].items():
            if isinstance(r, dict):
                lines.append(
                    f"| {row['config']} | {row['batch']} | {name} | {r['compile_s']:.1f} | "
                    f"{r['min_s']:.3f} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['share_of_matmul_peak']:.0%} |"
                )
        if "speedup_vs_book" in row["results"]:
            res = row["results"]
            lines.append(
                f"| {row['config']} | {row['batch']} | **gptflax / book speed** | | "
                f"**{res['speedup_vs_book']:.2f}x** | {res['speedup_vs_book_median']:.2f}x | | |"
            )
    lines += ["", "## Functional vs NNX (one AdamW step, no dropout)", "",
              "| config | batch | implementation | compile s | min s | median s |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["nnx"]:
        for name, r in row["results"].items():
            lines.append(
                f"| {row['config']} | {row['batch']} | {name} | {r['compile_s']:.1f} | "
                f"{r['min_s']:.3f} | {r['median_s']:.3f} |"
            )
    gen = report["generate"]
    title = f"## Greedy generation, batch 1, {gen['new_tokens']} new tokens ({gen['config']})"
    lines += [
        "",
        title,
        "",
        "| implementation | first run s | min s | tokens/s |",
        "|---|---|---|---|",
    ]
    for name, r in gen["results"].items():
        lines.append(
            f"| {name} | {r['compile_s']:.1f} | {r['min_s']:.2f} | {r['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def save(report: dict, table: str, out: Path, name: str) -> None:
    """Write out/name.json and out/name.md, and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(table)
    print(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.md")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small sizes only (checks the script)")
    p.add_argument("--gpu", action="store_true",
                   help="the accelerator benchmark: 124M at context 1024, fp32 / bf16 / fused, "
                   "MFU (writes bench_gpu.json and bench_gpu.md)")  # fmt: skip
    p.add_argument("--batch", type=int, default=32, help="batch size of the --gpu train step")
    args = p.parse_args(argv)
    if args.gpu:
        return gpu_main(args)
    if torch is not None:
        torch.set_num_threads(os.cpu_count())
    load_before = os.getloadavg()[0]
    n = 512 if args.quick else 4096
    peak_by = matmul_gflops(n)
    peak = max(peak_by.values())
    if args.quick:
        tiny = SMALL.replace(context_length=64, emb_dim=64, n_layers=2)
        train_cases, nnx_cases, gen_cfg, new_tokens = (
            [(tiny, "tiny", 2)],
            [(tiny, "tiny", 2)],
            tiny,
            20,
        )
    else:
        train_cases = [(SMALL, "small (4x256)", 8), (M124, "124M", 2), (M124, "124M", 8)]
        nnx_cases, gen_cfg, new_tokens = [(SMALL, "small (4x256)", 8), (M124, "124M", 2)], M124, 200
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
        "nnx": [],
    }
    for cfg, name, batch in train_cases:
        print(f"train step: {name}, batch {batch}", flush=True)
        res = bench_train(cfg, batch, args.repeats, peak)
        report["train"].append({"config": name, "batch": batch, "results": res})
        bf16 = bench_train(cfg, batch, args.repeats, peak, bf16=True)["gptflax (jax.jit)"]
        report["train"].append(
            {"config": name, "batch": batch, "results": {"gptflax bf16 (jax.jit)": bf16}}
        )
    for cfg, name, batch in nnx_cases:
        print(f"functional vs NNX: {name}, batch {batch}", flush=True)
        report["nnx"].append(
            {"config": name, "batch": batch, "results": bench_nnx(cfg, batch, args.repeats)}
        )
    print("generation", flush=True)
    report["generate"] = {
        "config": f"{gen_cfg.n_layers} layers x {gen_cfg.emb_dim}",
        "new_tokens": new_tokens,
        "results": bench_generate(gen_cfg, new_tokens, max(2, args.repeats // 2)),
    }
    report["load_before"], report["load_after"] = load_before, os.getloadavg()[0]
    report["loaded"] = load_before > 0.5  # the load after is mostly this benchmark's own
    save(report, markdown(report), Path(args.out), "bench")
    return 0


def gpu_main(args) -> int:
    if jax.default_backend() == "cpu" and not args.quick:
        raise SystemExit(
            "--gpu found no accelerator: JAX runs on the CPU here. Install jax[cuda12] (or the "
            "TPU build) on a machine with one, or add --quick to check the script on the CPU."
        )
    cfg = GPT_CONFIG_124M  # context 1024, as GPT-2 was trained
    if args.quick:
        cfg = SMALL.replace(context_length=64, emb_dim=64, n_layers=2)
    report = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "gpu": gpu_report(cfg, args.batch if not args.quick else 2, args.repeats,
                                512 if args.quick else 8192)}  # fmt: skip
    save(report, gpu_markdown(report), Path(args.out), "bench_gpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
