"""`make bench` itself: its quick mode runs and reports numbers that agree with each other."""

import importlib
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from gptflax import gpt
from gptflax.losses import loss_fn

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
    batch_1, batch_8 = report["generate"]
    assert {"gptflax, no cache", "gptflax, KV cache"} <= set(batch_1["results"])
    assert "gptflax, no cache" not in batch_8["results"]
    # the same weights feed 8 rows per step: the limit is 8x batch 1's
    assert batch_8["bandwidth_limit_tokens_per_s"] == pytest.approx(
        8 * batch_1["bandwidth_limit_tokens_per_s"]
    )
    for gen in report["generate"]:
        for r in gen["results"].values():
            assert r["tokens_per_s"] == pytest.approx(gen["batch"] * 20 / r["min_s"])
    markdown = (tmp_path / "bench.md").read_text()
    assert "## Train step" in markdown and "gptflax, KV cache" in markdown


def xla_train_flops(cfg, batch: int) -> float:
    """FLOPs of one loss-and-gradient computation as XLA's cost analysis counts the compiled
    program (it counts a scanned loop's body once, so this is exact for one block only)."""
    assert cfg.n_layers == 1
    params = gpt.init_params(jax.random.key(0), cfg)
    x = jnp.zeros((batch, cfg.context_length), jnp.int32)
    grad_fn = jax.jit(jax.value_and_grad(partial(loss_fn, cfg=cfg.replace(drop_rate=0.0))))
    return grad_fn.lower(params, x, x).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("emb_dim", [32, 256])
def test_the_model_flops_formula_agrees_with_xla(monkeypatch, emb_dim):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    timing = importlib.import_module("timing")
    cfg = timing.SMALL.replace(emb_dim=emb_dim, n_layers=1)
    ours = timing.train_flops(cfg, 2, cfg.context_length)
    assert ours == pytest.approx(xla_train_flops(cfg, batch=2), rel=0.03)


def test_gpu_report_measures_mfu_against_the_nominal_peak(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # the benchmark's files import each other
    gpu, report_md, timing = (importlib.import_module(m) for m in ("gpu", "report", "timing"))
    assert gpu.nominal_bf16_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu.nominal_bf16_tflops("cpu") is None
    monkeypatch.setattr(gpu, "nominal_bf16_tflops", lambda kind: 0.5)  # TFLOP/s, for the test
    tiny = timing.SMALL.replace(context_length=32, emb_dim=32, n_layers=1)
    report = gpu.gpu_report(tiny, batch=2, repeats=2, n=256)
    rows = {row["variant"]: row["results"] for row in report["train"]}
    assert list(rows) == ["fp32", "bf16", "bf16 + fused attention"]
    flops = xla_train_flops(tiny, batch=2) / 1e12  # counted by XLA, not by the bench's formula
    for r in rows.values():
        assert r["model_tflops_per_step"] == pytest.approx(flops, rel=0.05)
        assert r["mfu"] == pytest.approx(flops / r["min_s"] / 0.5, rel=0.05)
        assert r["share_of_matmul_peak"] == pytest.approx(
            flops * 1e3 / r["min_s"] / report["bf16_matmul_gflops"], rel=0.05
        )
    markdown = report_md.gpu_markdown({"date": "today", "jax": "x", "gpu": report})
    assert markdown.count("\n| ") == 1 + 3  # the header row and one row per variant


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="this machine has an accelerator")
def test_gpu_mode_without_an_accelerator_says_what_to_do():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--gpu"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "found no accelerator" in result.stderr and "jax[cuda12]" in result.stderr
