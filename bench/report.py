"""The benchmarks' reports: markdown tables of the CPU and GPU results, and saving them."""

from __future__ import annotations

import json
from pathlib import Path

from gptflax.speed import ladder_table


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
        f"## The speed ladder: {g['config']} (AdamW, no dropout, {g['steps']} steps a rung)",
        "",
        *ladder_table(g["ladder"] + ([g["torch"]] if g["torch"] else [])),
        "",
        "## SmolLM2-135M",
        "",
        *(ladder_table(g["llama"]) if g["llama"] else ["(not measured)"]),
    ]
    if g["split"]:
        lines += stage_rows([{"config": g["best"], "batch": g["rows"], "stages": g["split"]}])
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
    ] + [f"**left out, its process died (out of memory?): {case}**" for case in report["left_out"]]


def _train_rows(report: dict) -> list[str]:
    if not report["train"]:  # --generate-only
        return []
    lines = [
        "",
        "## Train step (AdamW; dropout 0.1 in the GPTs, none in the Llama)",
        "",
        "| config | context | batch | implementation | compile s | min s | median s | tokens/s "
        "| share of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["train"]:
        res = row["results"]
        for name, r in res.items():
            if isinstance(r, dict):
                lines.append(
                    f"| {row['config']} | {row['context']} | {row['batch']} | {name} "
                    f"| {r['compile_s']:.1f} | "
                    f"{r['min_s']:.3f} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['share_of_matmul_peak']:.0%} |"
                )
        for key, name in (("speedup_vs_book", "book"), ("speedup_vs_sdpa", "SDPA")):
            if key in res:
                lines.append(
                    f"| {row['config']} | {row['context']} | {row['batch']} "
                    f"| **gptflax / {name} speed** | | "
                    f"**{res[key]:.2f}x** | {res[f'{key}_median']:.2f}x | | |"
                )
    return lines


def stage_rows(splits: list[dict]) -> list[str]:
    """A table of where each profiled train step's op time goes, ms per step and share."""
    if not splits:
        return []
    stages = list(dict.fromkeys(stage for row in splits for stage in row["stages"]))
    lines = [
        "",
        "## Where a train step's time goes (op time per step in ms from a profile, share)",
        "",
        "| config | batch | " + " | ".join(stages) + " |",
        "|---|---|" + "---|" * len(stages),
    ]
    for row in splits:
        cells = (row["stages"].get(stage, {"ms": 0.0, "share": 0.0}) for stage in stages)
        lines.append(
            f"| {row['config']} | {row['batch']} | "
            + " | ".join(f"{c['ms']:,.0f} ({c['share']:.0%})" for c in cells)
            + " |"
        )
    return lines


def markdown(report: dict) -> str:
    lines = _header(report) + _train_rows(report) + stage_rows(report["stages"])
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
    gbps = [gen["memory_gbps"] for gen in report["generate"]]
    measured = f" ({min(gbps):.1f}-{max(gbps):.1f} GB/s memory bandwidth measured)" if gbps else ""
    lines += [
        "",
        f"## Greedy generation{measured}",
        "",
        "Bandwidth limit: the tokens/s at which each decoding step only reads the float32 weights,",
        "at the bandwidth of 512 MB copies timed between the case's runs (its GB/s column).",
        "gptflax's KV cache decodes from `decoding_params`, laid out once per model (layout s, the",
        "first call with its compile, is outside the timings).",
        "",
        "| config | batch | new tokens | implementation | first run s | min s | tokens/s "
        "| GB/s | share of bandwidth limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for gen in report["generate"]:
        limit = gen["bandwidth_limit_tokens_per_s"]
        for name, r in gen["results"].items():
            layout = f" (layout {r['layout_s']:.1f} s)" if "layout_s" in r else ""
            lines.append(
                f"| {gen['config']} | {gen['batch']} | {gen['new_tokens']} | {name}{layout} "
                f"| {r['compile_s']:.1f} | {r['min_s']:.2f} | {r['tokens_per_s']:.1f} "
                f"| {gen['memory_gbps']:.1f} | {r['tokens_per_s'] / limit:.0%} |"
            )
        torch_kv = gen["results"].get("book PyTorch, KV cache")
        if torch_kv:
            ratio = gen["results"]["gptflax, KV cache"]["tokens_per_s"] / torch_kv["tokens_per_s"]
            lines.append(
                f"| {gen['config']} | {gen['batch']} | | **gptflax / PyTorch KV cache** | | "
                f"| **{ratio:.2f}x** | | |"
            )
    return "\n".join(lines) + "\n"


def save(report: dict, table: str, out: Path, name: str) -> None:
    """Write out/name.json and out/name.md, and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(table)
    print(table)
