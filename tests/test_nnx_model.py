"""The Flax NNX twin computes what the functional model computes, shown three ways."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptflax import models
from gptflax.config import GPTConfig
from gptflax.losses import loss_fn
from gptflax.nnx_model import GPTModel, from_params, to_params

pytestmark = pytest.mark.lab4

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0)
CFG_BIAS = CFG.replace(qkv_bias=True)


def batch():
    tokens = jax.random.randint(jax.random.key(7), (4, 9), 0, CFG.vocab_size)
    return tokens[:, :-1], tokens[:, 1:]


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


@pytest.mark.parametrize("cfg", [CFG, CFG_BIAS], ids=["no_qkv_bias", "qkv_bias"])
def test_same_tree_structure_both_ways(cfg):
    functional = models.init_params(jax.random.key(0), cfg)
    nnx_params = to_params(GPTModel(cfg, rngs=nnx.Rngs(0)))
    assert shapes(nnx_params) == shapes(functional)
    assert shapes(to_params(from_params(cfg, functional))) == shapes(functional)


@pytest.mark.parametrize("cfg", [CFG, CFG_BIAS], ids=["no_qkv_bias", "qkv_bias"])
def test_equal_eval_logits_in_both_directions(cfg):
    inputs, _ = batch()
    params = models.init_params(jax.random.key(0), cfg)  # functional -> NNX
    np.testing.assert_allclose(
        from_params(cfg, params)(inputs), models.forward(params, inputs, cfg), rtol=1e-5, atol=1e-5
    )
    twin = GPTModel(cfg, rngs=nnx.Rngs(1))  # NNX -> functional
    np.testing.assert_allclose(
        models.forward(to_params(twin), inputs, cfg), twin(inputs), rtol=1e-5, atol=1e-5
    )


def test_one_adamw_step_gives_equal_loss_and_params():
    inputs, targets = batch()
    tx = optax.adamw(4e-4, weight_decay=0.1)
    params = models.init_params(jax.random.key(0), CFG)

    @jax.jit
    def functional_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, CFG)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), loss

    twin = from_params(CFG, params)
    optimizer = nnx.Optimizer(twin, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(twin, optimizer):
        def loss_of(m):
            logits = m(inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = nnx.value_and_grad(loss_of)(twin)
        optimizer.update(twin, grads)
        return loss

    new_params, loss = functional_step(params, tx.init(params))
    nnx_loss = nnx_step(twin, optimizer)
    np.testing.assert_allclose(loss, nnx_loss, rtol=1e-6)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), new_params, params)
    assert min(jax.tree.leaves(moved)) > 0  # every leaf took a step
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        new_params,
        to_params(twin),
    )


def test_dropout_in_the_twin_follows_its_rngs():
    cfg = CFG.replace(drop_rate=0.5)
    twin = GPTModel(cfg, rngs=nnx.Rngs(0))
    inputs, _ = batch()
    np.testing.assert_array_equal(twin(inputs), twin(inputs))  # no rngs: evaluation
    a = twin(inputs, rngs=nnx.Rngs(dropout=1))
    b = twin(inputs, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, twin(inputs, rngs=nnx.Rngs(dropout=2)))
    # Dropout masks differ from the functional model's by construction; compare statistics:
    # at rate 0.5 the train-mode logits move away from eval about as far in both designs.
    params = to_params(twin)
    gap_nnx = float(jnp.abs(a - twin(inputs)).mean())
    gap_fn = float(
        jnp.abs(
            models.forward(params, inputs, cfg, key=jax.random.key(1))
            - models.forward(params, inputs, cfg)
        ).mean()
    )
    assert 0.5 < gap_nnx / gap_fn < 2.0


def test_params_of_another_config_are_refused():
    params = models.init_params(jax.random.key(0), CFG)
    with pytest.raises(ValueError, match="do not fit"):
        from_params(CFG.replace(emb_dim=64, n_heads=4), params)


def test_the_twin_draws_weights_and_biases_as_pytorch_does():
    params = to_params(GPTModel(CFG.replace(emb_dim=256, n_heads=4), rngs=nnx.Rngs(0)))
    fc1 = jax.tree.map(lambda leaf: leaf[0], params["trf_blocks"]["ff"]["fc1"])  # 256 -> 1024
    bound = 1 / np.sqrt(256)
    for leaf in (fc1["kernel"], fc1["bias"]):  # U(-bound, bound): std bound / sqrt(3)
        assert float(jnp.abs(leaf).max()) <= bound
        np.testing.assert_allclose(float(leaf.std()), bound / np.sqrt(3), rtol=0.1)
