"""Pretraining data: how fast `prepare` tokenizes the English corpus (MB of text a second, with
GPT-2's tokenizer, processes started included), and what a batch streamed from its token files
costs beside a 124M train step on the same batch (the share of the step spent loading).

`python bench/data.py [--quick] [--out runs/bench]` writes data.json and data.md (`make bench`
runs it after bench.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from report import save

from gptflax import corpora, models
from gptflax.config import GPT_CONFIG_124M, TINY
from gptflax.pipeline import TokenStream
from gptflax.tokenfiles import TokenFiles, prepare
from gptflax.training import init_train_state, jit_train_step, make_optimizer
from gptflax.training.run import Run, run_loss


def data_report(quick: bool) -> dict:
    names = ("moby-dick", "devil") if quick else tuple(corpora.SOURCES)
    folders = corpora.english_corpus(names)
    text_bytes = sum(p.stat().st_size for f in folders for p in f.iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = prepare(folders, Path(tmp) / "tokens", workers=os.cpu_count())
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare(folders, Path(tmp) / "tokens")
        again_s = time.perf_counter() - t0
        stream = _stream_vs_step(Path(tmp) / "tokens", quick)
        shutil.rmtree(Path(tmp) / "tokens")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "sources": list(names),
        "text_mb": text_bytes / 1e6,
        "tokens": sum(manifest["files"][s]["tokens"] for s in ("train", "val")),
        "prepare_s": prepare_s,
        "prepare_mb_per_s": text_bytes / 1e6 / prepare_s,
        "prepare_again_s": again_s,
        **stream,
    }


def _stream_vs_step(folder: Path, quick: bool) -> dict:
    """Median seconds to take one (8, 256) batch from the grain stream (read ahead in a thread,
    as training takes them), to read one without reading ahead, and of one train step of the
    model on it (the 124M; tiny in quick mode)."""
    cfg = (TINY if quick else GPT_CONFIG_124M).replace(context_length=256, drop_rate=0.0)
    rows, steps = 8, (3 if quick else 5)
    stream = TokenStream(TokenFiles.open(folder), "train", 256, rows, shuffle=True, seed=1)
    batches = stream.epoch_batches(1)
    load = []
    for _ in range(50):
        t0 = time.perf_counter()
        next(batches)
        load.append(time.perf_counter() - t0)
    dataset, read = stream.dataset(1), []
    for k in np.random.default_rng(0).integers(0, len(dataset), 50):
        t0 = time.perf_counter()
        dataset[int(k)]
        read.append(time.perf_counter() - t0)
    params = models.init_params(jax.random.key(0), cfg)
    tx = make_optimizer(4e-4, 0.1)
    state, step, _ = jit_train_step(init_train_state(params, tx), cfg, tx,
                                    run_loss(Run(model="tiny"), cfg), False)  # fmt: skip
    key, timings = jax.random.key(1), []
    for _, batch in itertools.islice(batches, steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        timings.append(time.perf_counter() - t0)
    step_s = float(np.median(timings[1:]))  # the first compiles
    load_s = float(np.median(load))
    return {"model": "tiny" if quick else "124M", "batch": [rows, 256], "load_s": load_s,
            "read_s": float(np.median(read)), "step_s": step_s,
            "load_share": load_s / step_s}  # fmt: skip


def data_markdown(r: dict) -> str:
    return "\n".join([
        f"# Pretraining data ({r['date']}, {r['cpus']} CPU cores)", "",
        "| measurement | value |", "|---|---|",
        f"| corpus | {', '.join(r['sources'])}: {r['text_mb']:.1f} MB, {r['tokens']:,} tokens |",
        f"| prepare (GPT-2 tokenizer, {r['cpus']} processes) | {r['prepare_s']:.1f} s, "
        f"**{r['prepare_mb_per_s']:.1f} MB/s** |",
        f"| prepare again, unchanged | {r['prepare_again_s']:.2f} s |",
        f"| one ({r['batch'][0]}, {r['batch'][1]}) batch from the grain stream | "
        f"{r['load_s'] * 1e3:.3f} ms |",
        f"| the same read without reading ahead | {r['read_s'] * 1e3:.3f} ms |",
        f"| one {r['model']} train step on it | {r['step_s']:.2f} s |",
        f"| loading's share of a step | **{r['load_share']:.4%}** |", "",
    ])  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench", help="folder for data.json and data.md")
    p.add_argument("--quick", action="store_true", help="two small sources and a tiny model")
    args = p.parse_args(argv)
    report = data_report(args.quick)
    save(report, data_markdown(report), Path(args.out), "data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
