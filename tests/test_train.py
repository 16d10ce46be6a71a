"""Losses, the train step, appendix D's schedule and clipping, and resuming (Book ch. 5, App. D)."""

import math
import os
import signal
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptflax import checkpoint, models
from gptflax.config import TINY
from gptflax.data import DataLoader, train_val_loaders
from gptflax.losses import cross_entropy, loss_fn
from gptflax.training import (
    calc_loss_loader,
    clip_by_global_norm_from,
    fit,
    init_train_state,
    make_optimizer,
    resume,
    train_step,
    warmup_cosine_schedule,
)

pytestmark = pytest.mark.lab5


def test_cross_entropy_book_values_and_ignore_index():
    logits = jnp.array([[-1.0, 1.0], [-0.5, 1.5]])
    assert round(float(cross_entropy(logits, jnp.array([0, 1]))), 4) == 1.1269
    logits3 = jnp.array([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    assert round(float(cross_entropy(logits3, jnp.array([0, 1, 1]))), 4) == 0.7936
    assert round(float(cross_entropy(logits3, jnp.array([0, 1, -100]))), 4) == 1.1269


def test_cross_entropy_equals_optax_on_random_batches():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 11))
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    np.testing.assert_allclose(cross_entropy(logits, targets), expected, rtol=1e-6)


def test_fresh_model_loss_is_near_uniform_and_book_split_sizes(verdict_text):
    train, val = train_val_loaders(verdict_text, context_length=256, batch_size=2)
    assert sum(x.size for x, _ in train.batches(0)) == 4_608
    assert sum(x.size for x, _ in val.batches(0)) == 512
    params = models.init_params(jax.random.key(0), TINY)
    x, y = next(iter(val))
    loss = float(loss_fn(params, x[:, :32], y[:, :32], TINY))
    assert abs(loss - math.log(50257)) < 0.5


def test_calc_loss_loader_averages_the_first_batches():
    data = np.arange(8.0)
    loader = DataLoader(data, data, batch_size=2)
    assert calc_loss_loader(lambda x, y: x.mean(), loader) == np.mean([0.5, 2.5, 4.5, 6.5])
    assert calc_loss_loader(lambda x, y: x.mean(), loader, num_batches=2) == 1.5
    assert math.isnan(calc_loss_loader(lambda x, y: 0.0, DataLoader(data[:1], batch_size=2)))


def random_loader(cfg, n=8, seed=0, **kwargs):
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, 17)).astype(np.int32)
    return DataLoader(tokens[:, :-1], tokens[:, 1:], batch_size=2, **kwargs)


def test_train_step_lowers_the_loss_and_dropout_is_seeded(small_cfg):
    cfg = small_cfg.replace(drop_rate=0.1)
    tx = make_optimizer(1e-3)
    x, y = next(iter(random_loader(cfg)))
    step = jax.jit(lambda s, k: train_step(s, (x, y), k, loss=partial(loss_fn, cfg=cfg), tx=tx))
    state = init_train_state(models.init_params(jax.random.key(0), cfg), tx)
    first = float(step(state, jax.random.key(1))[1]["loss"])
    again = float(step(state, jax.random.key(1))[1]["loss"])
    other = float(step(state, jax.random.key(2))[1]["loss"])
    assert first == again and first != other
    for _ in range(30):
        state, metrics = step(state, jax.random.key(1))
    assert float(metrics["loss"]) < first - 1.0 and int(state.step) == 30


def test_adamw_matches_the_books_torch_defaults_on_a_toy_problem():
    # torch.optim.AdamW, written out: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)
    lr, wd, b1, b2, eps = 4e-4, 0.1, 0.9, 0.999, 1e-8
    p = jnp.array([1.0, -2.0, 3.0])
    grads = [jnp.array([0.1, 0.2, -0.3]), jnp.array([-0.5, 0.1, 0.0])]
    tx = make_optimizer(lr, wd)
    state, ours = tx.init(p), p
    m = v = jnp.zeros(3)
    ref = p
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        ref = ref - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + wd * ref)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def appendix_d_lrs(peak_lr, total_steps, warmup_steps, initial_lr=3e-5, min_lr=1e-6):
    """The appendix's train_model schedule, as its loop computes it."""
    lrs, increment = [], (peak_lr - initial_lr) / warmup_steps
    for step in range(total_steps):
        if step < warmup_steps:
            lrs.append(initial_lr + step * increment)
        else:
            progress = (step - warmup_steps) / (total_steps - warmup_steps)
            lrs.append(min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lrs


def test_warmup_cosine_schedule_equals_appendix_d():
    total_steps = 15 * 9  # 15 epochs of 9 batches
    warmup_steps = int(0.2 * total_steps)
    assert (total_steps, warmup_steps) == (135, 27)
    schedule = warmup_cosine_schedule(1e-3, total_steps, warmup_steps)
    ours = [float(schedule(s)) for s in range(total_steps)]
    np.testing.assert_allclose(ours, appendix_d_lrs(1e-3, total_steps, warmup_steps), rtol=1e-5)
    assert max(ours) == pytest.approx(1e-3) and ours.index(max(ours)) == warmup_steps


def test_clipping_starts_at_warmup_steps_as_the_errata_says():
    clip = clip_by_global_norm_from(start_step=2, max_norm=1.0)
    g = {"a": jnp.array([3.0, 4.0])}  # norm 5
    state = clip.init(g)
    norms = []
    for _ in range(4):
        out, state = clip.update(g, state)
        norms.append(float(optax.tree.norm(out)))
    np.testing.assert_allclose(norms, [5.0, 5.0, 1.0, 1.0], rtol=1e-6)


def test_a_resumed_run_equals_an_uninterrupted_one(small_cfg, tmp_path):
    cfg = small_cfg.replace(drop_rate=0.1)  # dropout too: its keys must line up after resuming
    tx = make_optimizer(1e-3)
    key = jax.random.key(5)

    def run(num_epochs, ckpt, state=None, history=None):
        state = state or init_train_state(models.init_params(jax.random.key(0), cfg), tx)
        return fit(
            state,
            random_loader(cfg, n=12, shuffle=True, seed=3),
            random_loader(cfg, n=4, seed=9),
            cfg,
            tx,
            num_epochs=num_epochs,
            key=key,
            eval_freq=2,
            eval_iter=2,
            checkpoint_dir=ckpt,
            history=history,
        )

    full_state, full = run(3, tmp_path / "full")
    run(1, tmp_path / "cut")  # interrupted after epoch 1
    template = init_train_state(models.init_params(jax.random.key(42), cfg), tx)
    state, history = resume(tmp_path / "cut", template, cfg)
    assert history.epochs_done == 1 and int(state.step) == 6
    resumed_state, resumed = run(3, tmp_path / "cut", state, history)
    assert resumed.train_losses == full.train_losses and resumed.val_losses == full.val_losses
    assert resumed.tokens_seen == full.tokens_seen and resumed.steps == full.steps
    jax.tree.map(np.testing.assert_array_equal, resumed_state.params, full_state.params)


@pytest.mark.parametrize("presses, kept", [(1, [1]), (2, [])])
def test_ctrl_c_stops_between_steps_and_twice_at_once(small_cfg, tmp_path, presses, kept):
    tx = make_optimizer(1e-3)
    state = init_train_state(models.init_params(jax.random.key(0), small_cfg), tx)

    def press_ctrl_c(params):  # called at the end of epoch 1, before its checkpoint is saved
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs in between
        return ""

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        loaders = random_loader(small_cfg, n=8), random_loader(small_cfg, n=4)
        fit(state, *loaders, small_cfg, tx, num_epochs=3, key=jax.random.key(1),
            sample_fn=press_ctrl_c, checkpoint_dir=tmp_path)  # fmt: skip
    assert checkpoint.complete_steps(tmp_path) == kept  # once: epoch 1 is saved, then it stops
    assert signal.getsignal(signal.SIGINT) is before
