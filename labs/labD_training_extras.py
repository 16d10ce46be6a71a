# %% [markdown]
# # Lab D: adding bells and whistles to the training loop (appendix D)
#
# Learning-rate warmup, cosine decay and gradient clipping, each as an optax piece, checked
# against the appendix's own arithmetic, then chapter 5's pretraining run with all three.
# By default: the 124M model, context 256, 15 epochs (about 15 minutes on 2 CPU cores).
# GPTFLAX_QUICK=1 trains a tiny model for 3 epochs instead.

# %%
print("\n# D.1 Learning-rate warmup: the step counts")
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from labkit import QUICK, run_dir

from gptflax import files, models
from gptflax.config import GPT_CONFIG_124M, TINY
from gptflax.data import train_val_loaders
from gptflax.generate import sample_text
from gptflax.losses import loss_fn
from gptflax.plots import plot_learning_rate, plot_losses
from gptflax.tokenizer import gpt2_tokenizer
from gptflax.training import (
    calc_loss_loader,
    clip_by_global_norm_from,
    fit,
    init_train_state,
    make_optimizer,
    warmup_cosine_schedule,
)

RUNS = run_dir("labD")  # runs/labD, or runs/quick/labD in quick mode
cfg = TINY.replace(context_length=64) if QUICK else GPT_CONFIG_124M.replace(context_length=256)
n_epochs = 3 if QUICK else 15
text_data = files.resolve("the-verdict.txt").read_text(encoding="utf-8")
train_loader, val_loader = train_val_loaders(text_data, cfg.context_length, batch_size=2)

# The appendix's numbers are for the 124M run: 9 batches per epoch, 15 epochs.
book_total_steps = 9 * 15
book_warmup_steps = int(0.2 * book_total_steps)  # 20% warmup
print("appendix D: total steps", book_total_steps, "warmup steps", book_warmup_steps)
total_steps = len(train_loader) * n_epochs
warmup_steps = int(0.2 * total_steps)
print("this run:   total steps", total_steps, "warmup steps", warmup_steps)

# %%
print("\n# D.1-D.2 Linear warmup, then cosine decay, as an optax schedule")
initial_lr, peak_lr, min_lr = 1e-4, 0.01, 1e-5  # the appendix's illustration
illustration = warmup_cosine_schedule(
    peak_lr, book_total_steps, book_warmup_steps, initial_lr, min_lr
)

np.set_printoptions(precision=4, suppress=True)  # 4 digits, as the book prints
lrs = [float(illustration(step)) for step in range(book_total_steps)]
# The appendix computes the same thing inside its loop:
lr_increment = (peak_lr - initial_lr) / book_warmup_steps
by_hand = [
    initial_lr + step * lr_increment
    if step < book_warmup_steps
    else min_lr
    + (peak_lr - min_lr)
    * 0.5
    * (1 + math.cos(math.pi * (step - book_warmup_steps) / (book_total_steps - book_warmup_steps)))
    for step in range(book_total_steps)
]
print(f"lr at step 0: {lrs[0]:.2e}, at step {book_warmup_steps}: {lrs[book_warmup_steps]:.2e}")
print(f"lr at the last step: {lrs[-1]:.2e}")
print("learning-rate plot:", plot_learning_rate(lrs, f"{RUNS}/lr_schedule.png"))

# %%
print("\n# D.3 Gradient clipping: scale all gradients down when their global norm exceeds 1.0")
params = models.init_params(jax.random.key(123), cfg)
inputs, targets = next(iter(train_loader.batches(0)))
grads = jax.grad(loss_fn)(params, inputs, targets, cfg)
clip = optax.clip_by_global_norm(1.0)
clipped, _ = clip.update(grads, clip.init(grads))
norm_before, norm_after = float(optax.tree.norm(grads)), float(optax.tree.norm(clipped))
max_before = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
max_after = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(clipped))
print(f"global norm {norm_before:.4f} -> {norm_after:.4f}")
print(f"largest gradient {max_before:.4f} -> {max_after:.4f}")
# Clipping starts at step warmup_steps: the book's errata moved it there from the step after.
late_clip = clip_by_global_norm_from(book_warmup_steps, 1.0)
clip_state = late_clip.init(grads)
clip_norms = []
for _ in range(book_warmup_steps + 1):
    out, clip_state = late_clip.update(grads, clip_state)
    clip_norms.append(float(optax.tree.norm(out)))

# %%
print("\n# D.4 The training loop with warmup, cosine decay and clipping")
schedule = warmup_cosine_schedule(1e-3, total_steps, warmup_steps, initial_lr=1e-5, min_lr=1e-5)
tx = make_optimizer(schedule, weight_decay=0.1, max_grad_norm=1.0, clip_from_step=warmup_steps)
tokenizer = gpt2_tokenizer()


batch_loss = jax.jit(loss_fn)  # compiled once, reused for every batch


def eval_batch(x, y):
    return batch_loss(params, x, y, cfg)


initial_train_loss = calc_loss_loader(eval_batch, train_loader)
state, history = fit(
    init_train_state(params, tx),
    train_loader,
    val_loader,
    cfg,
    tx,
    num_epochs=n_epochs,
    key=jax.random.key(456),
    eval_freq=5,
    eval_iter=1,
    sample_fn=lambda p: sample_text(p, tokenizer, "Every effort moves you", cfg),
)
run_lrs = [float(schedule(s)) for s in range(total_steps)]
plot_learning_rate(run_lrs, f"{RUNS}/lr_run.png")
epochs_seen = np.linspace(0, n_epochs, len(history.train_losses))
plot = plot_losses(
    epochs_seen, history.tokens_seen, history.train_losses, history.val_losses, f"{RUNS}/loss.png"
)
final_train, final_val = history.train_losses[-1], history.val_losses[-1]
print(f"final: train loss {final_train:.3f}, val loss {final_val:.3f}; plots in {RUNS}/")

# %%
print("\n# Checks")
assert (book_total_steps, book_warmup_steps) == (135, 27)
np.testing.assert_allclose(lrs, by_hand, rtol=1e-5)
assert math.isclose(lrs[0], initial_lr, rel_tol=1e-5)  # float32 arithmetic
assert math.isclose(lrs[book_warmup_steps], peak_lr, rel_tol=1e-5)
assert np.argmax(lrs) == book_warmup_steps and lrs[-1] < 2 * min_lr
assert abs(norm_after - min(norm_before, 1.0)) < 1e-4 and max_after <= max_before
cosine = sum(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.vdot(a, b), grads, clipped)))
assert abs(float(cosine) / (norm_before * norm_after) - 1) < 1e-4  # same direction, shorter
assert clip_norms[book_warmup_steps - 1] == norm_before  # not clipped during warmup
assert abs(clip_norms[book_warmup_steps] - min(norm_before, 1.0)) < 1e-4  # clipped from step 27
assert int(state.step) == total_steps
if QUICK:  # a tiny model and 3 epochs: the loss must clearly fall
    assert final_train < initial_train_loss - 1.5, history.train_losses
else:  # like chapter 5, the 124M model fits its training text
    assert final_train < 1.0, history.train_losses
print("lab D: all checks passed")
