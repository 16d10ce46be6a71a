"""Where one train step's time goes: a JAX profile of the compiled step, its ops' times summed by
the model stage that their named scope (`jax.named_scope` in the model code) puts them in."""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax

# Named scope -> stage, searched from the innermost scope of an op outwards. The backward pass
# keeps the forward's scopes (transpose(jvp(attention))), so each stage counts both directions.
SCOPES = {
    "embed": "embedding",
    "attention": "attention",  # with its layer norm, dropout and shortcut
    "feed_forward": "feed-forward",  # likewise
    "final_norm": "head and loss",
    "head": "head and loss",
    "loss": "head and loss",
    "optimizer": "optimizer",
}
STAGES = ("embedding", "attention", "feed-forward", "head and loss", "optimizer")
SCAN = "layer scan"  # slicing each layer's weights out, stacking its saved values
OTHER = "other"


def stage_of(op_name: str) -> str:
    """The stage of an HLO op from its metadata's op_name, a '/'-separated scope path."""
    path = op_name.split(";")[0].split("/")  # a fused op may list several paths: take the first
    for scope in reversed(path):
        for word in re.findall(r"\w+", scope):
            if word in SCOPES:
                return SCOPES[word]
    return SCAN if re.search(r"index_in_dim|dynamic_(update_)?slice", op_name) else OTHER


def op_stages(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> stage, for every instruction of a compiled module: by its op_name
    (a fusion carries the op_name of the op at its root), else by its own name (the loop's
    slicing, which XLA adds after JAX, has none)."""
    stages = {}
    for line in hlo_text.splitlines():
        if instruction := re.match(r"\s*(?:ROOT )?%?([\w.-]+) = ", line):
            name = instruction.group(1)
            op_name = re.search(r'op_name="([^"]*)"', line)
            if op_name:
                stages[name] = stage_of(op_name.group(1))
            elif re.search(r"dynamic[-_](update[-_])?slice", name):
                stages[name] = SCAN
    return stages


def trace_events(folder: Path) -> tuple[list[dict], set]:
    """The complete ('X') events of the perfetto trace `jax.profiler.trace` wrote under folder,
    and the ids of its device processes (none on a CPU)."""
    (path,) = folder.glob("**/perfetto_trace.json.gz")
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    devices = {
        e["pid"] for e in events
        if e.get("name") == "process_name" and e["args"]["name"].startswith("/device:")
    }  # fmt: skip
    return [e for e in events if e.get("ph") == "X"], devices


def event_stage(event: dict, stages: dict[str, str]) -> str | None:
    """The stage of a profiled op or kernel: by its HLO op (a GPU kernel's `hlo_op`, unless that
    names the CUDA graph it ran in) or by its name, which on a GPU is the op's with '_' for '.'."""
    names = [(event.get("args") or {}).get("hlo_op"), event["name"]]
    for name in filter(None, names):
        if name in stages:
            return stages[name]
    return None


def stage_split(compiled, run, steps: int = 2) -> dict:
    """Run `run()` (one call of the compiled step, waited for) `steps` times under the profiler;
    each stage's op time per step, in ms, and its share of all the step's op time. On a CPU, ops
    on different threads may overlap, so the ms add up to more than the wall time. On a GPU,
    kernels no op claims (a library's inside a CUDA graph) count as other."""
    stages = op_stages(compiled.as_text())
    stages |= {name.replace(".", "_"): stage for name, stage in stages.items()}
    totals = collections.Counter()
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        events, devices = trace_events(Path(folder))
    for e in events:
        if devices and e.get("pid") not in devices:
            continue  # on a GPU the host's events are not the step's ops
        stage = event_stage(e, stages)
        if stage is None and devices:
            stage = OTHER
        if stage is not None:
            totals[stage] += e["dur"]  # microseconds
    total = sum(totals.values())
    if not total:
        raise RuntimeError("the profile matched none of the step's ops: no stage split")
    return {
        stage: {"ms": totals[stage] / 1e3 / steps, "share": totals[stage] / total}
        for stage in (*STAGES, SCAN, OTHER)
        if stage in totals or stage in STAGES
    }
