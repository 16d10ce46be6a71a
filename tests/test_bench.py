"""`make bench` itself: its quick mode runs and reports numbers that agree with each other."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
pytestmark = pytest.mark.slow


def test_quick_bench_writes_consistent_json_and_markdown(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--repeats", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    for row in report["train"]:
        for r in row["results"].values():
            if isinstance(r, dict):
                assert r["min_s"] <= r["median_s"] and r["compile_s"] > 0
                assert r["tokens_per_s"] == pytest.approx(row["batch"] * 64 / r["min_s"])
        res = row["results"]
        if "book PyTorch" in res:
            ratio = res["book PyTorch"]["min_s"] / res["gptflax (jax.jit)"]["min_s"]
            assert res["speedup_vs_book"] == pytest.approx(ratio)
    assert set(report["nnx"][0]["results"]) == {
        "functional jax.jit", "NNX nnx.jit", "NNX split/merge under jax.jit"
    }  # fmt: skip
    generation = report["generate"]["results"]
    assert {"gptflax, no cache", "gptflax, KV cache"} <= set(generation)
    markdown = (tmp_path / "bench.md").read_text()
    assert "## Train step" in markdown and "gptflax, KV cache" in markdown
