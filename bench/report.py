"""The benchmarks' reports: markdown tables of the CPU and GPU results, and saving them."""

from __future__ import annotations

import json
from pathlib import Path


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


def _header(report: dict) -> list[str]:
    malloc = ", ".join(f"{k}={v}" for k, v in report["malloc_env"].items() if v is not None)
    return [
        f"# gptflax benchmarks ({report['date']}, {report['device']})",
        "",
        f"fp32 matmul throughput at {report['matmul_n']}^3: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_gflops"].items()),
        f"load average before / after: {report['load_before']:.2f} / {report['load_after']:.2f} "
        f"on {report['cpus']} CPUs{' (the machine looked loaded)' if report['loaded'] else ''}",
        f"glibc malloc: {malloc}"
        if malloc
        else "glibc malloc: defaults (run through `make bench` for the settings the Makefile sets)",
    ]


def _train_rows(report: dict) -> list[str]:
    if not report["train"]:  # --generate-only
        return []
    lines = [
        "",
        "## Train step (AdamW, dropout 0.1)",
        "",
        "| config | batch | implementation | compile s | min s | median s | tokens/s "
        "| share of matmul peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["train"]:
        res = row["results"]
        for name, r in res.items():
            if isinstance(r, dict):
                lines.append(
                    f"| {row['config']} | {row['batch']} | {name} | {r['compile_s']:.1f} | "
                    f"{r['min_s']:.3f} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['share_of_matmul_peak']:.0%} |"
                )
        if "speedup_vs_book" in res:
            lines.append(
                f"| {row['config']} | {row['batch']} | **gptflax / book speed** | | "
                f"**{res['speedup_vs_book']:.2f}x** | {res['speedup_vs_book_median']:.2f}x | | |"
            )
    return lines


def markdown(report: dict) -> str:
    lines = _header(report) + _train_rows(report)
    if report["nnx"]:
        lines += ["", "## Functional vs NNX (one AdamW step, no dropout)", "",
                  "| config | batch | implementation | compile s | min s | median s |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["nnx"]:
        for name, r in row["results"].items():
            lines.append(
                f"| {row['config']} | {row['batch']} | {name} | {r['compile_s']:.1f} | "
                f"{r['min_s']:.3f} | {r['median_s']:.3f} |"
            )
    lines += [
        "",
        f"## Greedy generation ({report['memory_gbps']:.1f} GB/s memory bandwidth measured)",
        "",
        "Bandwidth limit: the tokens/s at which each decoding step only reads the float32 weights.",
        "",
        "| config | batch | new tokens | implementation | first run s | min s | tokens/s "
        "| share of bandwidth limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for gen in report["generate"]:
        limit = gen["bandwidth_limit_tokens_per_s"]
        for name, r in gen["results"].items():
            lines.append(
                f"| {gen['config']} | {gen['batch']} | {gen['new_tokens']} | {name} "
                f"| {r['compile_s']:.1f} | {r['min_s']:.2f} | {r['tokens_per_s']:.1f} "
                f"| {r['tokens_per_s'] / limit:.0%} |"
            )
        torch_kv = gen["results"].get("book PyTorch, KV cache")
        if torch_kv:
            ratio = gen["results"]["gptflax, KV cache"]["tokens_per_s"] / torch_kv["tokens_per_s"]
            lines.append(
                f"| {gen['config']} | {gen['batch']} | | **gptflax / PyTorch KV cache** | | "
                f"| **{ratio:.2f}x** | |"
            )
    return "\n".join(lines) + "\n"


def save(report: dict, table: str, out: Path, name: str) -> None:
    """Write out/name.json and out/name.md, and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(table)
    print(table)
