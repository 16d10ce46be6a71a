# %% [markdown]
# # Lab speed: the training-speed ladder (bonus to chapter 5)
#
# The book's bonus ch05/10 takes chapter 5's GPT from 12,525 to 142,156 tokens/s on one A100, one
# change at a time. This lab climbs the same ladder in JAX. Each rung is a setting of the run
# (`gptflax.training.Run`, `python -m gptflax train --help`), and each is checked to train the
# same model: the same steps on the same data give the baseline's losses, within a tolerance the
# rung states. What changes is time and memory.
#
# On a GPU it climbs with the 124M model at context 1024 in bf16; on this CPU with a small GPT in
# float32, where it also shows which rungs do not pay and why. Then: the fused loss's memory at
# Gemma 3's vocabulary, and Muon beside AdamW at equal steps (the book's bonus ch05/18).
# By default a few minutes on 2 CPU cores; GPTFLAX_QUICK=1 runs a tiny model for a few steps.

# %%
print("\n# The model, the data and the step this lab measures")
import jax
import jax.numpy as jnp
import numpy as np
from labkit import QUICK, run_dir

from gptflax import files, models, speed
from gptflax.config import GPT_CONFIG_124M, GPTConfig
from gptflax.losses import head_cross_entropy
from gptflax.plots import plot_series
from gptflax.tokenizer import gpt2_tokenizer
from gptflax.training.run import Run, step_config

RUNS = run_dir("labspeed")
ON_GPU = jax.default_backend() == "gpu"
if ON_GPU:  # the book's ladder: GPT-2 124M at context 1024
    cfg, rows, micro, steps = GPT_CONFIG_124M, 64, (16, 32, 64), 6
elif QUICK:
    cfg = GPTConfig(context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    rows, micro, steps = 4, (2, 4), 3
else:  # small enough for a CPU, with GPT-2's vocabulary (the head is what three rungs change)
    cfg = GPTConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4)
    rows, micro, steps = 8, (2, 4, 8), 6
cfg = cfg.replace(drop_rate=0.0)  # fused attention has no dropout; the ladder compares losses
tokenizer = gpt2_tokenizer()
text = files.resolve("the-verdict.txt").read_text(encoding="utf-8")
tokens = np.array(tokenizer.encode(text), np.int32)
batches = speed.window_batches(tokens, steps, rows, cfg.context_length)
params = models.init_params(jax.random.key(123), cfg)
peak = speed.peak_tflops()  # a GPU's datasheet bf16 peak; on a CPU, its float32 matmul measured
print(f"MFU is measured against {peak:.3g} TFLOP/s")
print(f"{jax.default_backend()}: {cfg.n_layers} layers x {cfg.emb_dim}, context "
      f"{cfg.context_length}, {rows} rows a step in micro-batches of {micro[0]}, {steps} steps "
      "a rung")  # fmt: skip

# %% [markdown]
# ## The rungs, derived
#
# - **bf16 compute, float32 master weights.** The loss is computed from a bf16 copy of the
#   params (`losses.mixed_precision`); the gradient of that cast is the identity, so the
#   optimizer receives float32 gradients and updates float32 weights. Layer norms, the softmax
#   and the loss stay in float32. A GPU's tensor cores multiply bf16 at twice the fp32 rate or
#   more; this CPU has no bf16 arithmetic and converts every operand, so the rung is for GPUs.
# - **Fused attention.** softmax(QK^T / sqrt(d))V needs no (T, T) matrix in memory: flash
#   attention walks the keys in blocks, keeping a running maximum and sum per query. gptflax
#   names cuDNN's kernel explicitly on NVIDIA GPUs, so a setup it cannot run fails instead of
#   falling back.
# - **Vocabulary padded to 128.** The head is an (N, 768) x (768, 50,257) matmul; 50,257 is
#   prime to every tile size. `loss_fn(..., pad_vocab=128)` pads the head's kernel with 47 zero
#   columns inside the loss and sets their logits to -inf: exp(-inf) = 0, so the padding adds
#   nothing to the softmax's sum, is never predicted, and gets no gradient. The params keep the
#   book's shapes.
# - **Fused head and loss.** The float32 logits of a step are B x T x V x 4 bytes (3.3 GB for
#   16 x 1024 x 50,257). With l = logsumexp(z) - z_target and z = hW, dl/dz = softmax(z) -
#   onehot(target), so dh = (dl/dz) W^T and dW = h^T (dl/dz): `head_cross_entropy` computes a
#   chunk of positions' logits, its loss and these two gradients at once, and moves on. No logits
#   outlive their chunk, and the backward pass has nothing left to do.
# - **Larger micro-batches.** The step's rows stay fixed (the optimizer sees the same batch); the
#   micro-batch is how many of them go through the model at once, the rest by gradient
#   accumulation (`accum_steps`). Fewer, larger kernels keep a GPU busy.
# - **Rematerialisation.** `remat="dots"` keeps each block's matmul outputs for the backward and
#   recomputes the cheap elementwise ops (`jax.checkpoint`), freeing memory for a larger batch.

# %%
print("\n# The ladder, measured side by side")
base = Run(model="124M", context_length=cfg.context_length, batch_size=rows, drop_rate=0.0)
chunk = min(4096, micro[0] * cfg.context_length)
rungs = speed.ladder(micro, chunk, rows, bf16=ON_GPU)
ladder = speed.climb(base, rungs, cfg, params, batches, peak)
print()
print("\n".join(speed.ladder_table(ladder)))
helped = [
    r["rung"] for prev, r in zip(ladder, ladder[1:], strict=False)
    if r["tokens_per_s"] > 1.05 * prev["tokens_per_s"]
]  # fmt: skip
print("\nrungs that made the step at least 5% faster here:", helped or "none")
if not ON_GPU:
    print(
        "On a CPU the step is compute-bound: its float32 matmuls already run near the cores' "
        "peak, and there is no bf16 arithmetic to switch to. Rungs that save memory traffic "
        "(fused attention, the fused loss) or fill a GPU's many cores (larger micro-batches) "
        "buy little here, and their extra passes (the padding's mask, the chunks' gradient "
        "sums) can cost a little; the fused loss still saves memory, as the next cell "
        "measures. The H100's table in the README is where the ladder pays: 3.9x."
    )

# %%
print("\n# The largest micro-batch that fits, with and without remat")
# Compiling a step tells its memory before it runs (`speed.step_memory`): the largest micro-batch
# of a step of many rows is found by halving until one fits. On a GPU the limit is the device's
# memory; here, for the illustration, 1.5x what the book's step took.
if ON_GPU:
    limit = jax.devices()[0].memory_stats()["bytes_limit"]
else:
    limit = int(1.5 * ladder[0]["memory_gib"] * 2**30)
fastest = speed.cumulative(base, rungs)[-1][1].replace(batch_size=16 * rows)
largest = {
    remat: speed.largest_micro_batch(fastest.replace(remat=remat), cfg, params, limit)
    for remat in ("none", "dots")
}  # fmt: skip
print(f"in {limit / 2**30:.2f} GiB, the fastest settings fit a micro-batch of {largest['none']} "
      f"rows, and {largest['dots']} with remat (dots)")  # fmt: skip

# %%
print("\n# Memory: the fused loss at Gemma 3's vocabulary (262,144), batch 8 x 256")
# XLA's accounting of the compiled loss-and-gradient of the head and the loss alone: what it
# holds at its peak, counted before it runs (the same on any device).
vocab, d_model, b, t = 262_144, 640, 8, 256
h = jax.ShapeDtypeStruct((b, t, d_model), jnp.float32)
kernel = jax.ShapeDtypeStruct((d_model, vocab), jnp.float32)
targets = jax.ShapeDtypeStruct((b, t), jnp.int32)


def head_memory(chunk_size):
    grad = jax.grad(lambda h, w, y: head_cross_entropy(h, w, y, chunk_size), argnums=(0, 1))
    return speed.memory_bytes(jax.jit(grad).lower(h, kernel, targets).compile()) / 2**30


plain_gib, fused_gib = head_memory(None), head_memory(256)
weights_gib = 2 * d_model * vocab * 4 / 2**30  # the kernel and its gradient: any loss holds them
logits_gib = b * t * vocab * 4 / 2**30
print(f"plain: {plain_gib:.2f} GiB; fused, 256 positions a chunk: {fused_gib:.2f} GiB. Beyond "
      f"the kernel and its gradient ({weights_gib:.2f} GiB), the plain loss holds "
      f"{plain_gib - weights_gib:.2f} GiB (the float32 logits are {logits_gib:.2f} GiB, and their "
      f"gradient as much), the fused one {fused_gib - weights_gib:.2f} GiB")  # fmt: skip

# %%
print("\n# Muon beside AdamW, at equal steps (the book's bonus ch05/18)")
# Muon orthogonalises each weight matrix's momentum (a few Newton-Schulz iterations) before the
# step, so every direction of the matrix moves by about the same amount; AdamW scales each entry
# on its own. Embeddings, norms and the head stay with AdamW, as Muon's authors advise.
muon_steps = 12 if QUICK else 60
curve_batches = speed.window_batches(tokens, muon_steps, micro[0], cfg.context_length, seed=1)
curves = {}
adamw_lr = 1e-2 if QUICK else 1e-3  # each optimizer at a learning rate usual for its kind
for name, lr in (("adamw", adamw_lr), ("muon", 0.02)):
    run = base.replace(batch_size=micro[0], optimizer=name, lr=lr)
    curves[name] = speed.measure(run, step_config(run, cfg), params, curve_batches, peak)["losses"]
    print(f"{name} (lr {lr}): loss {curves[name][0]:.3f} -> {curves[name][-1]:.3f}")
tokens_seen = np.arange(1, muon_steps + 1) * micro[0] * cfg.context_length
plot_series(tokens_seen, {"AdamW": curves["adamw"], "Muon": curves["muon"]}, "Tokens seen",
            "Training loss", f"{RUNS}/muon_vs_adamw.png")  # fmt: skip
print(f"loss curves: {RUNS}/muon_vs_adamw.png")

# %%
print("\n# Checks")
assert all(r["same_model"] for r in ladder), [(r["rung"], r["max_loss_diff"]) for r in ladder]
assert largest["dots"] >= largest["none"] >= micro[0], largest  # remat frees memory for rows
assert plain_gib - weights_gib > 1.5 * logits_gib  # the logits and their gradient, at least
assert fused_gib - weights_gib < logits_gib / 2, (plain_gib, fused_gib)  # the logits are gone
for name, losses in curves.items():  # both train: the last steps' mean well below the first's
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - (0.3 if QUICK else 1.0), (name, losses)
if ON_GPU:  # bf16, flash attention and the rest pay on an accelerator
    assert ladder[-1]["tokens_per_s"] > 2 * ladder[0]["tokens_per_s"]
print("lab speed: all checks passed")
