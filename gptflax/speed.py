"""The training-speed ladder (the book's bonus ch05/10): one change to the train step at a time,
each measured side by side with the others (tokens/s, model-FLOPs utilisation, memory, compile
time) and checked to train the same model as the baseline (its losses, step by step, within a
stated tolerance).

Every rung is a setting of the run (`gptflax.training.Run`): bf16 compute with float32 master
weights, fused (flash) attention, the vocabulary padded for the head's matmul, the head and loss
fused and chunked, micro-batches with gradient accumulation, rematerialisation. The ladder keeps
the tokens of an optimizer step fixed (the run's batch), so every rung takes the same steps on the
same data; what a larger micro-batch buys is speed, not a different optimisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gptflax.config import LlamaConfig
from gptflax.training.optim import make_optimizer
from gptflax.training.run import BOOK_STEP, Run, run_loss, step_config
from gptflax.training.step import init_train_state, train_step

# Dense bf16 peak of the SXM parts, TFLOP/s, from NVIDIA's datasheets: what MFU is measured against.
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def nominal_bf16_tflops(device_kind: str) -> float | None:
    """The datasheet's dense bf16 peak of a device kind, None where it is not listed."""
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in device_kind), None)


def peak_tflops(n: int = 2048, repeats: int = 5) -> float:
    """What MFU is measured against: the datasheet's dense bf16 peak of a known accelerator,
    else (a CPU) the float32 matmul throughput measured here at n^3, in TFLOP/s."""
    nominal = nominal_bf16_tflops(jax.devices()[0].device_kind)
    if nominal is not None:
        return nominal
    a = jax.random.normal(jax.random.key(0), (n, n))
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e12


def matmul_weights(cfg) -> int:
    """Weights each token is multiplied by: every block's kernels and the output head."""
    d = cfg.emb_dim
    if isinstance(cfg, LlamaConfig):  # q and out D x D, k and v D x (G * Dh), SwiGLU 3 D x hidden
        per_layer = 2 * d * d + 2 * d * cfg.n_kv_heads * cfg.head_dim + 3 * d * cfg.hidden_dim
    else:  # qkv and out 4 D^2, MLP 8 D^2
        per_layer = 12 * d * d
    return cfg.n_layers * per_layer + d * cfg.vocab_size


def train_flops(cfg, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward): 2 per multiply-add
    of every weight matrix per token, plus the attention scores and weighted sums."""
    attention = cfg.n_layers * 2 * 2 * seq * cfg.emb_dim  # QK^T and AV per token, full (unmasked)
    return 3 * 2 * batch * seq * (matmul_weights(cfg) + attention / 2)


@dataclass(frozen=True)
class Rung:
    """One change to the train step: the run settings it adds to the rungs below it, the
    largest relative difference from the baseline's loss allowed at any measured step, and why it
    helps."""

    name: str
    changes: dict
    tolerance: float
    why: str


BF16_TOLERANCE = 5e-3  # bf16 keeps 8 bits of mantissa: losses drift apart by about 0.1%
FP32_TOLERANCE = 1e-4  # the same sums in another order


def ladder(micro_batches: tuple[int, ...], chunk: int, batch_size: int, bf16: bool) -> list:
    """The rungs in order, for a step of `batch_size` rows in micro-batches of the first of
    `micro_batches`: bf16 (where `bf16`), fused attention, the padded vocabulary, the fused
    chunked head and loss (`chunk` positions at a time), then each larger micro-batch, the last
    of several with rematerialisation (what lets it fit)."""
    tol = BF16_TOLERANCE if bf16 else FP32_TOLERANCE
    first = {**BOOK_STEP, "accum_steps": batch_size // micro_batches[0]}
    rungs = [Rung(f"baseline (fp32, the book's step), micro-batch {micro_batches[0]}", first, 0.0,
                  "the reference")]  # fmt: skip
    if bf16:
        rungs.append(Rung(
            "bf16 compute, fp32 master weights", {"bf16": True}, tol,
            "bf16 matmuls run on the tensor cores at twice fp32's rate or more, and move half "
            "the bytes; the optimizer still updates float32 weights",
        ))  # fmt: skip
    rungs += [
        Rung("fused attention", {"fused_attention": True}, tol,
             "flash attention never writes the (T, T) scores to memory"),
        Rung("vocabulary padded to 128", {"pad_vocab": 128}, tol,
             "50,304 columns tile the matmul evenly; 50,257 leave a ragged edge"),
        Rung(f"fused head and loss ({chunk} positions a chunk)", {"loss_chunk": chunk}, tol,
             "the (B, T, V) float32 logits are never stored, nor read back for the backward"),
    ]  # fmt: skip
    larger = micro_batches[1:]
    for i, micro in enumerate(larger):
        remat = {"remat": "dots"} if i == len(larger) - 1 and i > 0 else {}
        rungs.append(Rung(
            f"micro-batch {micro}" + (" with remat (dots)" if remat else ""),
            {"accum_steps": batch_size // micro, **remat}, tol,
            "fewer, larger kernels keep the device busier"
            + ("; recomputing the elementwise ops frees the memory it needs" if remat else ""),
        ))  # fmt: skip
    return rungs


def cumulative(base: Run, rungs: list) -> list[tuple[Rung, Run]]:
    """Each rung with the run that has its changes and those of every rung before it."""
    runs, changes = [], {}
    for rung in rungs:
        changes = {**changes, **rung.changes}
        runs.append((rung, base.replace(**changes)))
    return runs


def memory_bytes(compiled) -> int | None:
    """What a compiled step holds at its peak, from XLA's own accounting: its arguments, its
    scratch and the outputs that do not reuse an argument's buffer."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
    return stats.argument_size_in_bytes + stats.temp_size_in_bytes + outputs


def jit_step(run: Run, cfg):
    """The run's jitted train step (donating its state) and its optimizer."""
    cfg = step_config(run, cfg)
    tx = make_optimizer(run.lr, run.weight_decay, optimizer=run.optimizer)
    loss = run_loss(run, cfg)
    step = partial(train_step, loss=loss, tx=tx, accum_steps=run.accum_steps)
    return jax.jit(step, donate_argnums=0), tx


def step_memory(run: Run, cfg, params: dict, rows: int) -> int:
    """What `run`'s train step holds at its peak for a batch of `rows` windows of the config's
    context (`memory_bytes`), from compiling it; nothing runs."""
    step, tx = jit_step(run, cfg)
    state = jax.eval_shape(lambda: init_train_state(params, tx))
    batch = (jax.ShapeDtypeStruct((rows, cfg.context_length), jnp.int32),) * 2
    return memory_bytes(step.lower(state, batch, jax.random.key(0)).compile())


def largest_micro_batch(run: Run, cfg, params: dict, limit_bytes: int) -> int | None:
    """The largest micro-batch, batch_size / 2^k, whose step fits in `limit_bytes`: the step's
    batch through gradient accumulation (`accum_steps`), its memory counted by compiling it
    (`step_memory`). None if not even one row fits."""
    micro = run.batch_size
    while micro >= 1:
        trial = run.replace(accum_steps=run.batch_size // micro)
        if step_memory(trial, cfg, params, run.batch_size) <= limit_bytes:
            return micro
        if micro % 2:
            return None
        micro //= 2
    return None


def measure(run: Run, cfg, params: dict, batches: list, peak_tflops: float | None) -> dict:
    """Train `params` one step on each of `batches` ((rows, T) inputs and targets) as `run`
    says: the losses, the compile time, the step's memory, and its fastest and median time after
    the first (tokens/s, and MFU against `peak_tflops` where given). Also returns the `compiled`
    step and `rerun`, one more step of it (for a profile)."""
    step, tx = jit_step(run, cfg)
    state = [init_train_state(jax.tree.map(jnp.copy, params), tx)]
    key = jax.random.key(run.seed)
    t0 = time.perf_counter()
    compiled = step.lower(state[0], batches[0], key).compile()
    compile_s = time.perf_counter() - t0

    def one_step(batch) -> float:
        state[0], metrics = compiled(state[0], batch, key)
        return float(metrics["loss"])  # waits for the step

    losses, times = [], []
    for batch in batches:
        t0 = time.perf_counter()
        losses.append(one_step(batch))
        times.append(time.perf_counter() - t0)
    timed = times[1:] or times  # the first call also loads the executable
    rows, seq = batches[0][0].shape
    return {
        "losses": losses,
        "compile_s": compile_s,
        "memory_gib": (memory_bytes(compiled) or 0) / 2**30,
        "median_s": float(np.median(timed)),
        **throughput(cfg, rows, seq, min(timed), peak_tflops),
        "compiled": compiled,
        "rerun": lambda: one_step(batches[0]),
    }


def throughput(cfg, rows: int, seq: int, step_s: float, peak_tflops: float | None) -> dict:
    """A train step of `rows` windows of `seq` tokens taking `step_s`: its step_s, tokens/s,
    model TFLOP/s (`train_flops`) and MFU against `peak_tflops` (None where not given)."""
    tflops = train_flops(cfg, rows, seq) / step_s / 1e12
    return {"step_s": step_s, "tokens_per_s": rows * seq / step_s, "tflops": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None}  # fmt: skip


def climb(
    base: Run, rungs: list, cfg, params: dict, batches: list, peak_tflops=None, keep_going=False
) -> list:
    """Measure every rung (`measure`), cumulative over the ladder, and check its losses against
    the first rung's: each row gets `max_loss_diff`, relative to the first rung's loss, and
    `same_model` (within its tolerance). With
    `keep_going`, a rung that fails (out of memory, say) is a row with its `error`."""
    rows = []
    for rung, run in cumulative(base, rungs):
        print(f"rung: {rung.name}", flush=True)
        try:
            row = measure(run, cfg, params, batches, peak_tflops)
        except Exception as e:
            if not keep_going:
                raise
            rows.append({"rung": rung.name, "why": rung.why, "error": f"{type(e).__name__}: {e}"})
            print(f"  failed: {rows[-1]['error'][:300]}", flush=True)
            continue
        row = {"rung": rung.name, "why": rung.why, "tolerance": rung.tolerance, **row}
        reference = next((r["losses"] for r in rows if "losses" in r), row["losses"])
        diff = np.abs(np.subtract(row["losses"], reference)) / np.abs(reference)
        row["max_loss_diff"] = float(np.max(diff))
        row["same_model"] = row["max_loss_diff"] <= rung.tolerance
        rows.append(row)
        print(f"  {row['step_s']:.3f} s/step, {row['tokens_per_s']:,.0f} tokens/s, "
              f"{row['memory_gib']:.2f} GiB, compile {row['compile_s']:.1f} s, loss "
              f"{row['losses'][-1]:.4f} (max diff {row['max_loss_diff']:.2g})",
              flush=True)  # fmt: skip
    return rows


def ladder_table(rows: list[dict]) -> list[str]:
    """`climb`'s rows (and rows like them: a failed rung's error, a row measured elsewhere with
    no memory or loss check) as a markdown table, speeds also as multiples of the first row's."""
    first = next((r["tokens_per_s"] for r in rows if "tokens_per_s" in r), None)
    lines = [
        "| rung (each adds to those above) | step s | tokens/s | x first | MFU | memory GiB "
        "| compile s | loss diff (allowed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['rung']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        memory = f"{r['memory_gib']:.2f}" if "memory_gib" in r else ""
        check = ""
        if "same_model" in r:
            check = f"{r['max_loss_diff']:.1e} ({r['tolerance']:g})" if r["tolerance"] else "ref."
            check += "" if r["same_model"] else " **differs**"
        lines.append(
            f"| {r['rung']} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} "
            f"| {r['tokens_per_s'] / first:.2f} | {mfu} | {memory} | {r['compile_s']:.1f} "
            f"| {check} |"
        )
    return lines


def window_batches(tokens: np.ndarray, steps: int, rows: int, seq: int, seed: int = 0) -> list:
    """`steps` batches of `rows` windows of seq + 1 tokens from random offsets of `tokens` (the
    same for every rung): [(inputs, targets), ...], each (rows, seq) int32."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq - 1, (steps, rows))
    windows = tokens[starts[..., None] + np.arange(seq + 1)].astype(np.int32)
    return [(w[:, :-1], w[:, 1:]) for w in windows]
