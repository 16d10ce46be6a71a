"""`make bench` itself: its quick mode runs and reports numbers that agree with each other."""

import importlib
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from gptflax import models, speed
from gptflax.config import LLAMA_TINY
from gptflax.losses import loss_fn
from gptflax.training import init_train_state, make_optimizer, train_step

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
            # the GPTs also beside PyTorch's fused attention; the Llama beside the book's only
            assert ("PyTorch + SDPA" in res) == row["config"].startswith("GPT")
    assert set(report["nnx"][0]["results"]) == {
        "functional jax.jit", "NNX nnx.jit", "NNX split/merge under jax.jit"
    }  # fmt: skip
    gens = {(gen["config"], gen["batch"]): gen for gen in report["generate"]}
    models = ("GPT tiny", "Qwen3 tiny")
    assert set(gens) == {(model, b) for model in models for b in (1, 8)}
    if report["torch"]:  # the Qwen3 beside the book's batched KV cache, with the ratio
        assert "book PyTorch, KV cache" in gens["Qwen3 tiny", 8]["results"]
        assert "**gptflax / PyTorch KV cache**" in (tmp_path / "bench.md").read_text()
    batch_1, batch_8 = gens["GPT tiny", 1], gens["GPT tiny", 8]
    assert {"gptflax, no cache", "gptflax, KV cache"} <= set(batch_1["results"])
    assert "gptflax, no cache" not in batch_8["results"]  # the slow loops once, GPT at batch 1
    assert "gptflax, no cache" not in gens["Qwen3 tiny", 1]["results"]
    # the same weights feed every row of a step, at the bandwidth measured between the case's runs
    per_row_and_gbps = [
        gen["bandwidth_limit_tokens_per_s"] / (gen["batch"] * gen["memory_gbps"])
        for gen in (batch_1, batch_8)
    ]
    assert per_row_and_gbps[0] == pytest.approx(per_row_and_gbps[1])
    for gen in report["generate"]:
        for r in gen["results"].values():
            assert r["tokens_per_s"] == pytest.approx(gen["batch"] * 20 / r["min_s"])
    markdown = (tmp_path / "bench.md").read_text()
    assert "## Train step" in markdown and "gptflax, KV cache" in markdown
    assert report["left_out"] == [] and "left out" not in markdown
    assert [row["config"] for row in report["stages"]] == ["GPT tiny", "Llama tiny"]


def test_each_case_runs_in_a_process_of_its_own_and_a_dead_one_is_left_out(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    cpu = importlib.import_module("cpu")
    assert cpu.in_own_process(pow, 2, 10) == 1024
    assert cpu.in_own_process(os.getpid) != os.getpid()
    assert cpu.in_own_process(os._exit, 9) is None  # as if killed for memory: no result, no crash


def xla_train_flops(cfg, batch: int) -> float:
    """FLOPs of one loss-and-gradient computation as XLA's cost analysis counts the compiled
    program (it counts a scanned loop's body once, so this is exact for one block only)."""
    assert cfg.n_layers == 1
    params = models.init_params(jax.random.key(0), cfg)
    x = jnp.zeros((batch, cfg.context_length), jnp.int32)
    grad_fn = jax.jit(jax.value_and_grad(partial(loss_fn, cfg=cfg)))
    return grad_fn.lower(params, x, x).compile().cost_analysis()["flops"]


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="XLA's GPU cost analysis counted 19x these FLOPs"
)
@pytest.mark.parametrize("emb_dim", [32, 256])
def test_the_model_flops_formula_agrees_with_xla(monkeypatch, emb_dim):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    timing = importlib.import_module("timing")
    gpt_cfg = timing.SMALL.replace(emb_dim=emb_dim, n_layers=1, drop_rate=0.0)
    llama_cfg = LLAMA_TINY.replace(
        emb_dim=emb_dim, n_heads=4, n_kv_heads=2, n_layers=1, hidden_dim=3 * emb_dim,
        vocab_size=gpt_cfg.vocab_size, context_length=gpt_cfg.context_length,
    )  # fmt: skip
    for cfg in (gpt_cfg, llama_cfg):
        ours = speed.train_flops(cfg, 2, cfg.context_length)
        assert ours == pytest.approx(xla_train_flops(cfg, batch=2), rel=0.03)


def test_the_stage_split_puts_each_op_in_its_named_scope(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    stages = importlib.import_module("stages")
    assert stages.stage_of("jit(step)/transpose(jvp(attention))/dot_general") == "attention"
    # the innermost stage wins: a loss scope around the forward would not swallow the blocks
    assert stages.stage_of("jit(step)/loss/while/body/block/feed_forward/mul") == "feed-forward"
    assert stages.stage_of("jit(step)/while/body/jit(dynamic_index_in_dim)/slice") == stages.SCAN
    assert stages.stage_of("jit(step)/optimizer/mul;jit(step)/head/dot") == "optimizer"
    # a real step: every stage shows up, and the shares add up to one
    cfg = LLAMA_TINY.replace(n_layers=2)
    params = models.init_params(jax.random.key(0), cfg)
    tx = make_optimizer(1e-3)
    step = jax.jit(partial(train_step, loss=partial(loss_fn, cfg=cfg), tx=tx))
    state, x = init_train_state(params, tx), jnp.ones((2, cfg.context_length), jnp.int32)
    compiled = step.lower(state, (x, x), jax.random.key(0)).compile()
    split = stages.stage_split(
        compiled, lambda: jax.block_until_ready(compiled(state, (x, x), jax.random.key(0)))
    )
    assert set(stages.STAGES) <= set(split)
    assert all(split[s]["ms"] > 0 for s in ("attention", "feed-forward", "head and loss"))
    assert sum(v["share"] for v in split.values()) == pytest.approx(1.0)


def test_gpu_report_climbs_the_ladder_and_measures_mfu_against_the_nominal_peak(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # the benchmark's files import each other
    gpu, report_md, timing = (importlib.import_module(m) for m in ("gpu", "report", "timing"))
    assert speed.nominal_bf16_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert speed.nominal_bf16_tflops("cpu") is None
    monkeypatch.setattr(speed, "nominal_bf16_tflops", lambda kind: 0.5)  # TFLOP/s, for the test
    tiny = timing.SMALL.replace(context_length=32, emb_dim=32, n_layers=1, vocab_size=4000)
    llama = LLAMA_TINY.replace(context_length=32, n_layers=1, vocab_size=tiny.vocab_size)
    saved = []
    report = gpu.gpu_report(tiny, llama, rows=4, micro=(2, 4), steps=3, n=256,
                            partial_save=saved.append, parts=("ladder", "llama"))  # fmt: skip
    assert len(saved) == 2 and report["torch"] is None  # after each part asked for
    names = [row["rung"] for row in report["ladder"]]
    assert names[0].startswith("baseline") and names[1].startswith("bf16")
    assert any("fused attention" in n for n in names) and names[-1] == "micro-batch 4"
    for row in report["ladder"] + report["llama"]:
        assert row["same_model"], (row["rung"], row["max_loss_diff"])
        assert "compiled" not in row and "rerun" not in row  # JSON holds the rest
        if jax.default_backend() == "cpu":  # counted by XLA, not by the formula
            cfg = tiny.replace(drop_rate=0.0) if row in report["ladder"] else llama
            flops = xla_train_flops(cfg, batch=4) / 1e12
            assert row["tflops"] * row["step_s"] == pytest.approx(flops, rel=0.05)
        assert row["mfu"] == pytest.approx(row["tflops"] / 0.5)
    assert report["best"] in names and sum(v["share"] for v in report["split"].values()) == (
        pytest.approx(1.0)
    )  # fmt: skip
    markdown = report_md.gpu_markdown({"date": "today", "jax": "x", "gpu": report})
    table_rows = markdown.count("\n| ")
    assert table_rows == (1 + len(names)) + (1 + 2) + (1 + 1)  # ladder, SmolLM2, split


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="this machine has an accelerator")
def test_gpu_mode_without_an_accelerator_says_what_to_do():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--gpu"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "found no accelerator" in result.stderr and "jax[cuda12]" in result.stderr


def test_the_data_bench_reports_prepare_speed_and_the_load_share_of_a_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    data = importlib.import_module("data")
    r = data.data_report(quick=True)
    assert r["prepare_mb_per_s"] == pytest.approx(r["text_mb"] / r["prepare_s"])
    assert r["tokens"] > r["text_mb"] * 1e5  # a token is a few bytes of English
    assert r["prepare_again_s"] < r["prepare_s"] and 0 < r["load_s"] < r["step_s"]
    assert 0 < r["read_s"] < r["step_s"]
    assert r["load_share"] == pytest.approx(r["load_s"] / r["step_s"])
    assert f"{r['prepare_mb_per_s']:.1f} MB/s" in data.data_markdown(r)
