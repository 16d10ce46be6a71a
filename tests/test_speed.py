"""The speed ladder's rungs (gptflax.speed, lab speed): each computes the same training step as the
book's, in less time or memory; and the ladder's own check catches a rung that does not."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptflax import attention, models, speed
from gptflax.config import LLAMA_TINY, TINY
from gptflax.losses import IGNORE_INDEX, cross_entropy, head_cross_entropy, loss_fn
from gptflax.training import init_train_state, make_optimizer, train_step
from gptflax.training.optim import muon_matrices
from gptflax.training.run import Run, step_config

CONFIGS = {"gpt": TINY, "llama": LLAMA_TINY}  # an untied head (GPT) and a tied one (Llama)


def batch(cfg, rows=4, seed=1):
    x = jax.random.randint(jax.random.key(seed), (rows, cfg.context_length), 0, cfg.vocab_size)
    return x, jnp.roll(x, -1, axis=1).at[0, :5].set(IGNORE_INDEX)  # some targets ignored


def max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.abs(x - y).max()) for x, y in pairs)


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize(
    "options", [{"pad_vocab": 128}, {"loss_chunk": 7}, {"loss_chunk": 32, "pad_vocab": 128}]
)
def test_padded_and_fused_losses_equal_the_plain_loss_and_gradients(family, options):
    cfg = CONFIGS[family]
    params = models.init_params(jax.random.key(0), cfg)
    x, y = batch(cfg)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, cfg)
    loss2, grads2 = jax.jit(jax.value_and_grad(partial(loss_fn, cfg=cfg, **options)))(params, x, y)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    assert max_diff(grads, grads2) < 1e-6  # 7 does not divide the rows: the padding is ignored


def test_the_padded_vocabulary_is_never_predicted():
    """Its logits are -inf: no probability, no gradient. Left at 0 (the zero columns' logits),
    the padding would take probability from every token, as the unmasked loss shows."""
    h = jax.random.normal(jax.random.key(0), (6, 16))
    kernel = jax.random.normal(jax.random.key(1), (16, 50), dtype=jnp.float32)
    targets = jnp.arange(6) * 7
    plain = cross_entropy(h @ kernel, targets)
    padded = head_cross_entropy(h, kernel, targets, pad_vocab=64)  # 14 padding columns
    unmasked = cross_entropy(h @ jnp.pad(kernel, ((0, 0), (0, 14))), targets)
    assert float(padded) == pytest.approx(float(plain), rel=1e-6)
    assert float(unmasked) > float(plain) + 1e-3  # what the mask prevents
    # The padded kernel's gradient: zero in the padding columns.
    grad = jax.grad(lambda k: head_cross_entropy(h, k, targets, chunk=4, pad_vocab=1))(
        jnp.pad(kernel, ((0, 0), (0, 14)))
    )
    assert float(jnp.abs(grad[:, 50:]).max()) > 0  # without padding they count as tokens
    d_kernel = jax.grad(lambda k: head_cross_entropy(h, k, targets, chunk=4, pad_vocab=64))(kernel)
    assert d_kernel.shape == kernel.shape  # the params keep their shapes


def test_the_fused_loss_holds_no_logits():
    """XLA's accounting of the compiled gradient: the plain loss holds the (N, V) float32 logits
    and their gradient; the fused one never more than a chunk's."""
    n, d, v = 2048, 64, 32768
    shapes = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
              jax.ShapeDtypeStruct((n,), jnp.int32))  # fmt: skip

    def memory(chunk):
        grad = jax.grad(lambda h, k, y: head_cross_entropy(h, k, y, chunk), argnums=(0, 1))
        return speed.memory_bytes(jax.jit(grad).lower(*shapes).compile())

    logits = n * v * 4
    assert memory(None) > 2 * logits
    assert memory(128) < logits


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("remat", ["dots", "full"])
def test_rematerialised_blocks_give_the_same_gradients_in_less_memory(family, remat):
    cfg = CONFIGS[family].replace(context_length=64)
    params = models.init_params(jax.random.key(0), cfg)
    x, y = batch(cfg)

    def compiled(c):
        return jax.jit(jax.value_and_grad(partial(loss_fn, cfg=c))).lower(params, x, y).compile()

    plain, rematted = compiled(cfg), compiled(cfg.replace(remat=remat))
    (loss, grads), (loss2, grads2) = plain(params, x, y), rematted(params, x, y)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    assert max_diff(grads, grads2) < 1e-6
    assert speed.memory_bytes(rematted) < speed.memory_bytes(plain)


def test_remat_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="remat: one of none, dots, full"):
        TINY.replace(remat="everything")


@pytest.mark.parametrize("family", CONFIGS)
def test_fused_attention_equals_the_books(family):
    cfg = CONFIGS[family]
    params = models.init_params(jax.random.key(0), cfg)
    x, _ = batch(cfg)
    plain = models.forward(params, x, cfg)
    fused = jax.jit(partial(models.forward, cfg=cfg.replace(fused_attention=True)))(params, x)
    assert float(jnp.abs(fused - plain).max()) < 1e-4


def test_fused_attention_names_cudnn_on_a_gpu_and_refuses_float32_there(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.fused_implementation(jnp.bfloat16) == "cudnn"
    with pytest.raises(ValueError, match="takes bf16 or fp16, not float32"):
        attention.fused_implementation(jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert attention.fused_implementation(jnp.float32) == "xla"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_accumulated_micro_batches_take_the_whole_batchs_step(optimizer):
    cfg = TINY
    params = models.init_params(jax.random.key(0), cfg)
    x, _ = batch(cfg, rows=4)
    y = jnp.roll(x, -1, axis=1)  # every target counts: each micro-batch's mean weighs the same
    tx = make_optimizer(1e-3, optimizer=optimizer)
    state = init_train_state(params, tx)
    steps = {
        n: jax.jit(partial(train_step, loss=partial(loss_fn, cfg=cfg), tx=tx, accum_steps=n))(
            state, (x, y), jax.random.key(2)
        )
        for n in (1, 2, 4)
    }  # fmt: skip
    for n in (2, 4):
        assert float(steps[n][1]["loss"]) == pytest.approx(float(steps[1][1]["loss"]), rel=1e-6)
        # after one update of 1e-3 per weight or so (Adam divides by |g|: rounding shows)
        assert max_diff(steps[n][0].params, steps[1][0].params) < 1e-5
    with pytest.raises(ValueError, match="3 equal micro-batches"):
        train_step(state, (x, y), jax.random.key(2), loss=partial(loss_fn, cfg=cfg), tx=tx,
                   accum_steps=3)  # fmt: skip


def test_muon_orthogonalises_the_blocks_matrices_and_leaves_the_rest_to_adamw():
    """Muon's update of a matrix moves all its directions alike; embeddings, norms and the head
    get AdamW's update (with Nesterov momentum, as optax's Muon has it)."""
    params = models.init_params(jax.random.key(0), TINY)
    dims = muon_matrices(params)
    assert dims["trf_blocks"]["att"]["W_query"]["kernel"] is not None
    assert dims["tok_emb"]["embedding"] is None and dims["out_head"]["kernel"] is None
    assert dims["trf_blocks"]["norm1"]["scale"] is None
    tx = make_optimizer(1.0, weight_decay=0.0, optimizer="muon")
    x, y = batch(TINY)
    grads = jax.grad(loss_fn)(params, x, y, TINY)
    updates, _ = tx.update(grads, tx.init(params), params)
    layers = zip(
        updates["trf_blocks"]["ff"]["fc1"]["kernel"],
        grads["trf_blocks"]["ff"]["fc1"]["kernel"],
        strict=True,
    )
    for update, grad in layers:  # (D, 4D) per layer
        # The layer norm before fc1 centres its input: the gradient has rank D - 1 (one singular
        # value 0, which orthogonalisation keeps); the other D - 1 Muon moves alike.
        s = np.linalg.svd(np.asarray(update), compute_uv=False)[:-1]
        g = np.linalg.svd(np.asarray(grad), compute_uv=False)[:-1]
        assert s.max() / s.min() < 3 < g.max() / g.min()
    adamw = optax.adamw(1.0, weight_decay=0.0, nesterov=True)  # optax's Muon: Nesterov for both
    adam_like = adamw.update(grads, adamw.init(params), params)[0]
    np.testing.assert_allclose(updates["tok_emb"]["embedding"], adam_like["tok_emb"]["embedding"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_run_settings_of_the_ladder_are_checked():
    with pytest.raises(ValueError, match="3 micro-batches do not split a batch of 8"):
        Run(batch_size=8, accum_steps=3)
    with pytest.raises(ValueError, match="optimizer: one of adamw, muon"):
        Run(optimizer="lion")
    with pytest.raises(ValueError, match="remat: one of"):
        Run(remat="some")
    with pytest.raises(ValueError, match="loss_chunk: must be 0 or more"):
        Run(loss_chunk=-1)


def test_speed_settings_left_open_are_the_books_on_a_cpu_and_the_fastest_elsewhere():
    assert Run().on_backend("cpu").bf16 is False and Run().on_backend("cpu").loss_chunk == 0
    gpu = Run(drop_rate=0.0).on_backend("gpu")
    assert (gpu.bf16, gpu.fused_attention, gpu.pad_vocab, gpu.loss_chunk) == (True, True, 128, 4096)
    assert Run().on_backend("gpu").fused_attention is False  # the book's dropout: no fused kernel
    assert Run(bf16=False, loss_chunk=0).on_backend("gpu").bf16 is False  # given: kept
    assert Run(drop_rate=0.0, bf16=False).on_backend("gpu").fused_attention is False  # cuDNN: bf16
    assert Run().on_backend("gpu").to_dict() != Run().to_dict()  # the record keeps None
    assert Run().to_dict()["bf16"] is None


def test_fused_attention_in_float32_on_a_gpu_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cfg = TINY.replace(drop_rate=0.0)
    assert step_config(Run(drop_rate=0.0, bf16=False), cfg).fused_attention is False
    with pytest.raises(ValueError, match="computes in bf16: add --bf16"):
        step_config(Run(drop_rate=0.0, bf16=False, fused_attention=True), cfg)
    assert step_config(Run(drop_rate=0.0), cfg).fused_attention is True  # the GPU's default


def test_the_ladder_trains_the_same_model_and_its_check_catches_one_that_does_not():
    cfg = TINY
    params = models.init_params(jax.random.key(0), cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (4000,), 0, cfg.vocab_size))
    batches = speed.window_batches(tokens, 3, 4, cfg.context_length)
    base = Run(model="tiny", context_length=cfg.context_length, batch_size=4, drop_rate=0.0)
    rungs = speed.ladder((2, 4), 16, 4, bf16=False)
    rows = speed.climb(base, rungs, cfg, params, batches)
    assert [r["rung"] for r in rows] == [r.name for r in rungs]
    assert all(r["same_model"] for r in rows), [(r["rung"], r["max_loss_diff"]) for r in rows]
    wrong = [rungs[0], speed.Rung("another learning rate", {"lr": 4e-2}, 1e-4, "")]
    assert not speed.climb(base, wrong, cfg, params, batches)[1]["same_model"]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(4 * cfg.context_length / r["step_s"])


def test_the_largest_micro_batch_is_the_largest_that_fits_and_remat_lets_it_grow():
    cfg = TINY.replace(context_length=128, vocab_size=512, n_layers=4)  # blocks take the memory
    params = models.init_params(jax.random.key(0), cfg)
    run = Run(model="tiny", context_length=128, batch_size=16, drop_rate=0.0, loss_chunk=0)
    memory = {m: speed.step_memory(run.replace(accum_steps=16 // m), cfg, params, 16)
              for m in (16, 8, 4)}  # fmt: skip
    assert memory[16] > memory[8] > memory[4]  # the micro-batch's activations
    assert speed.largest_micro_batch(run, cfg, params, memory[8]) == 8
    assert speed.largest_micro_batch(run, cfg, params, memory[8] - 1) == 4
    assert speed.largest_micro_batch(run, cfg, params, 1) is None
    rematted = run.replace(remat="full")
    assert speed.largest_micro_batch(rematted, cfg, params, memory[8]) == 16
