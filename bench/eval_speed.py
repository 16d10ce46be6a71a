"""How fast `gptflax.evaluate` scores HellaSwag, against this machine's matmul throughput:

    python bench/eval_speed.py --items 200 [--model smollm2-135m-instruct] [--batch-size 8]

The FLOPs an item needs: 2 per weight of the blocks for each of its real tokens (the context
once, each continuation once), and 2 per weight of the output head for each position that
predicts a continuation token. Divided by the time of one pass that compiles nothing (packed
rows are first scored once in each shape; through the KV cache, the first WARMUP items), that
is the model's GFLOP/s; the bound is XLA's square-matmul GFLOP/s measured in the same process,
before and after. `--items 10042` runs the whole validation set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import matmul_gflops  # noqa: E402

from gptflax import benchmarks, sources  # noqa: E402
from gptflax import evaluate as ev  # noqa: E402
from gptflax.decoding import decoding_params  # noqa: E402

FULL = 10_042  # HellaSwag validation items
WARMUP = 16  # items scored first through the KV cache, to compile


def item_flops(cfg, e: ev.Encoded) -> float:
    """FLOPs of one item's real tokens (no padding): blocks for every token, head per target."""
    d = cfg.emb_dim
    blocks = cfg.n_layers * (
        2 * d * d + 2 * d * cfg.n_kv_heads * cfg.head_dim + 3 * d * cfg.hidden_dim
    )
    targets = sum(map(len, e.continuations))
    return 2 * blocks * (len(e.context) + targets) + 2 * d * cfg.vocab_size * targets


def compile_shapes(params, cfg, encoded: list[ev.Encoded], rows: int) -> int:
    """Score one batch of packed rows of each shape the items need, so that the timed pass
    compiles nothing (rows hold up to 512 targets, padded to a few lengths); how many shapes."""
    shapes = {}
    for _, arrays in ev.packed_batches(encoded, rows):
        shapes.setdefault(tuple(a.shape for a in arrays), arrays)
    for *inputs, _, _ in shapes.values():
        jax.block_until_ready(ev.score_packed_rows(params, *inputs, cfg))
    return len(shapes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    model = sources.load_model(args.model)
    items = ev.spread(benchmarks.load_task("hellaswag"), args.items)
    encoded = [ev.encode_item(model.tokenizer, it) for it in items]
    flops = sum(item_flops(model.cfg, e) for e in encoded)
    before = matmul_gflops(2048)["jax"]
    params = decoding_params(model.params)  # as `evaluate` lays it out
    t0 = time.perf_counter()
    if ev.packs(model.cfg):
        shapes = compile_shapes(params, model.cfg, encoded, ev.packed_rows(args.batch_size))
        warmup = f"compiling {shapes} packed row shapes"
    else:
        ev.score(params, model.cfg, encoded[:WARMUP], batch_size=args.batch_size)
        warmup = f"{WARMUP} items compiling"
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tqdm(total=len(encoded), unit="item", mininterval=30) as bar:  # items/s, every 30 s
        scores = ev.score(params, model.cfg, encoded, batch_size=args.batch_size,
                          progress=bar.update)  # fmt: skip
    steady = time.perf_counter() - t0
    after = matmul_gflops(2048)["jax"]
    acc, acc_norm = ev.accuracy(items, scores.loglik)
    peak = max(before, after)
    print(f"{args.model}, {len(items)} HellaSwag items (spread), batch {args.batch_size}")
    print(f"  matmul (2048^3, XLA): {before:.0f} GFLOP/s before, {after:.0f} after")
    print(f"  {warmup}: {first:.1f} s; all, compiled: {steady:.1f} s, "
          f"{len(items) / steady:.2f} items/s")  # fmt: skip
    print(f"  {flops / len(items) / 1e9:.1f} GFLOP an item: {flops / steady / 1e9:.1f} GFLOP/s, "
          f"{100 * flops / steady / 1e9 / peak:.0f}% of the matmul throughput")  # fmt: skip
    bound = FULL * flops / len(items) / (peak * 1e9)
    print(f"  all {FULL:,} items: the FLOPs bound {bound / 60:.1f} min; at this rate "
          f"{FULL / (len(items) / steady) / 60:.1f} min plus compiling")  # fmt: skip
    print(f"  acc {100 * acc:.1f}, acc_norm {100 * acc_norm:.1f}")


if __name__ == "__main__":
    main()
