"""The accelerator benchmark: the speed ladder (`gptflax.speed`) of the 124M GPT's train step at
context 1024, every rung checked to train the same model; the book's GPTModel with torch.compile
and SDPA on the same device for the ratio; SmolLM2-135M's step plain and with the best rungs; and
where the best rung's time goes (its profile, split by model stage)."""

from __future__ import annotations

import jax
import numpy as np
from stages import stage_split
from timing import interleaved, matmul_gflops

from gptflax import models, speed
from gptflax.config import GPTConfig, LlamaConfig
from gptflax.training.run import BOOK_STEP, Run


def random_batches(cfg, steps: int, rows: int, seed: int = 0) -> list:
    """`steps` batches of `rows` windows of random tokens, as `speed.window_batches` cuts them."""
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, 1 << 20, dtype=np.int32)
    return speed.window_batches(tokens, steps, rows, cfg.context_length, seed)


def torch_compiled_step(cfg: GPTConfig, batch: tuple):
    """One step of the book's GPTModel with SDPA attention in bf16 autocast, compiled by
    torch.compile, fused AdamW, on the GPU: a callable that runs a step and waits for it, or
    None without torch and the book's package."""
    from baselines import book, torch, with_sdpa

    if torch is None or not torch.cuda.is_available():
        return None
    torch_cfg = {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length,
                 "emb_dim": cfg.emb_dim, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
                 "drop_rate": 0.0, "qkv_bias": cfg.qkv_bias}  # fmt: skip
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.enable_cudnn_sdp(False)  # its backward failed (CUDNN_STATUS_INTERNAL_ERROR)
    m = with_sdpa(book.GPTModel(torch_cfg)).cuda().train()
    opt = torch.optim.AdamW(m.parameters(), lr=4e-4, weight_decay=0.1, fused=True)
    compiled = torch.compile(m)
    x, y = (torch.from_numpy(np.asarray(a)).long().cuda() for a in batch)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(x)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        opt.step()
        torch.cuda.synchronize()

    return step


def time_torch(cfg: GPTConfig, batch: tuple, steps: int, peak: float | None) -> dict | None:
    """`torch_compiled_step`'s row of the ladder's table: its compile, its fastest and median
    step (timing.interleaved), tokens/s and MFU; None without torch and a GPU."""
    step = torch_compiled_step(cfg, batch)
    if step is None:
        return None
    timed = interleaved({"torch": step}, steps)["torch"]
    rows, seq = batch[0].shape
    return {"rung": f"book GPTModel, torch.compile + SDPA, bf16 autocast, batch {rows}",
            "compile_s": timed["compile_s"], "median_s": timed["median_s"],
            **speed.throughput(cfg, rows, seq, timed["min_s"], peak)}  # fmt: skip


PARTS = ("ladder", "torch", "llama", "best")


def gpu_report(cfg: GPTConfig, llama_cfg: LlamaConfig, rows: int, micro: tuple, steps: int,
               n: int, partial_save=None, parts=PARTS) -> dict:  # fmt: skip
    """The ladder of the GPT at `rows` rows a step (micro-batches `micro`) and the profile split
    of its fastest rung that trains the same model; the torch.compile baseline at the smallest
    micro-batch; SmolLM2's step in bf16 and with the best rungs; the GPT's best settings alone
    (`best`: under other XLA flags, say). `parts` picks among them; `partial_save(report)` is
    called after each, so that a run cut short keeps what it measured."""
    kind = jax.devices()[0].device_kind
    peak = speed.nominal_bf16_tflops(kind)
    chunk = min(4096, micro[0] * cfg.context_length)
    report = {"device_kind": kind, "nominal_bf16_tflops": peak,
              "bf16_matmul_gflops": matmul_gflops(n, dtype=jax.numpy.bfloat16)["jax"],
              "matmul_n": n, "rows": rows, "steps": steps, "ladder": [], "torch": None,
              "llama": [], "best": None, "split": None,
              "config": f"GPT {cfg.n_layers} layers x {cfg.emb_dim}, SmolLM2 {llama_cfg.n_layers} "
              f"layers x {llama_cfg.emb_dim}, context {cfg.context_length}, {rows} rows a step",
              }  # fmt: skip
    save = partial_save or (lambda r: None)
    base = Run(model="124M", context_length=cfg.context_length, batch_size=rows, drop_rate=0.0)
    batches = random_batches(cfg, steps, rows)
    params = models.init_params(jax.random.key(0), cfg)
    rungs = speed.ladder(micro, chunk, rows, bf16=True)
    if "best" in parts:  # every rung but the last (remat) at once
        changes = {k: v for rung in rungs[:-1] for k, v in rung.changes.items()}
        rungs = [speed.Rung("best settings", changes, 0.0, "")]
    if "ladder" in parts or "best" in parts:
        report["ladder"] = speed.climb(base, rungs, cfg, params, batches, peak, keep_going=True)
        ok = [r for r in report["ladder"] if r.get("same_model")]
        if ok and "ladder" in parts:
            best = max(ok, key=lambda r: r["tokens_per_s"])
            report["best"] = best["rung"]
            report["split"] = stage_split(best["compiled"], best["rerun"])
        for row in report["ladder"]:  # cuDNN's fused attention is a custom call in the program
            if "compiled" in row:
                row["cudnn_attention"] = "cudnn$fmha" in row["compiled"].as_text()
        _plain_rows(report["ladder"])
        save(report)
    if "torch" in parts:
        try:
            report["torch"] = time_torch(cfg, tuple(a[: micro[0]] for a in batches[0]), steps,
                                         peak)  # fmt: skip
        except Exception as e:  # out of memory, a kernel's failure: the rest still runs
            report["torch"] = {"rung": "book GPTModel, torch.compile", "error": repr(e)[:300]}
        save(report)
    del params
    if "llama" in parts:
        llama_rungs = [
            speed.Rung(f"bf16, micro-batch {micro[0]}",
                       {**BOOK_STEP, "bf16": True, "accum_steps": rows // micro[0]}, 0.0,
                       "the reference"),
            speed.Rung(f"+ fused attention, fused head and loss, micro-batch {micro[-1]}, remat",
                       {"fused_attention": True, "loss_chunk": chunk,
                        "accum_steps": rows // micro[-1], "remat": "dots"},
                       speed.BF16_TOLERANCE, ""),
        ]  # fmt: skip
        report["llama"] = speed.climb(
            base.replace(model="smollm2-135m"), llama_rungs, llama_cfg,
            models.init_params(jax.random.key(0), llama_cfg),
            random_batches(llama_cfg, steps, rows), peak, keep_going=True,
        )  # fmt: skip
        _plain_rows(report["llama"])
        save(report)
    return report


def _plain_rows(rows: list[dict]) -> None:
    """Drop what JSON cannot hold: each row's executable and its rerun."""
    for row in rows:
        row.pop("compiled", None), row.pop("rerun", None)
