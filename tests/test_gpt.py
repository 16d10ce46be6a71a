"""The GPT model (Book ch. 4): the book's parameter counts, and invariants of the forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import models, nn
from gptflax.config import GPT2_PRESETS, GPT_CONFIG_124M, GPTConfig

pytestmark = pytest.mark.lab4


def shapes(cfg):
    return jax.eval_shape(lambda: models.init_params(jax.random.key(0), cfg))


@pytest.mark.parametrize(
    "size,total,without_head",
    [
        ("124M", 163_009_536, 124_412_160),
        ("355M", 406_212_608, 354_749_440),
        ("774M", 838_220_800, 773_891_840),
        ("1558M", 1_637_792_000, 1_557_380_800),
    ],
)
def test_parameter_counts_match_the_book(size, total, without_head):
    params = shapes(GPT2_PRESETS[size])
    assert nn.count_params(params) == total
    assert nn.count_params(params) - nn.count_params(params["out_head"]) == without_head


def test_gpt2_weight_layout_and_memory_size():
    assert nn.count_params(shapes(GPT_CONFIG_124M.replace(qkv_bias=True))) == 163_037_184
    assert round(nn.count_params(shapes(GPT_CONFIG_124M)) * 4 / 1024**2, 2) == 621.83


def test_blocks_are_stacked(tiny_cfg):
    params = shapes(tiny_cfg)
    leaves = jax.tree.leaves(params["trf_blocks"])
    assert leaves and all(leaf.shape[0] == tiny_cfg.n_layers for leaf in leaves)
    assert params["trf_blocks"]["att"]["W_query"]["kernel"].shape == (2, 32, 32)


def test_layer_norm_and_gelu_against_independent_formulas():
    x = jax.random.normal(jax.random.key(0), (2, 5)) * 3 + 1
    out = nn.layer_norm(nn.init_layer_norm(5), x)
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.var(-1), 1.0, rtol=1e-4)  # biased variance, eps 1e-5
    np.testing.assert_allclose(nn.gelu(x), jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-7)


def test_gelu_derivative_written_out_matches_autodiff_of_the_formula():
    x = jnp.linspace(-6.0, 6.0, 241)
    ours = jax.vmap(jax.grad(nn.gelu))(x)
    autodiff = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=True)))(x)
    np.testing.assert_allclose(ours, autodiff, rtol=1e-5, atol=1e-6)
    second = jax.vmap(jax.grad(jax.grad(nn.gelu)))(x)  # the custom rule is differentiable too
    np.testing.assert_allclose(
        second,
        jax.vmap(jax.grad(jax.grad(lambda v: jax.nn.gelu(v, approximate=True))))(x),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 3, 7)])
def test_linear_flattened_matmul_and_its_gradients_match_einsum(shape):
    layer = nn.init_linear(jax.random.key(0), 7, 4)
    x = jax.random.normal(jax.random.key(1), shape)

    def reference(p, x):  # the contraction over the last axis, leading axes left as they are
        return jnp.einsum("...i,io->...o", x, p["kernel"]) + p["bias"]

    y = nn.linear(layer, x)
    assert y.shape == (*shape[:-1], 4)
    np.testing.assert_allclose(y, reference(layer, x), rtol=1e-6, atol=1e-6)
    weights = jax.random.normal(jax.random.key(2), y.shape)  # a loss that weighs every output

    def loss(f):
        return lambda p, x: jnp.sum(f(p, x) * weights)

    ours, theirs = (jax.grad(loss(f), argnums=(0, 1))(layer, x) for f in (nn.linear, reference))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_params(small_cfg):
    return models.init_params(jax.random.key(123), small_cfg)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 16), 0, 97)


def test_jit_takes_the_config_as_an_argument(tiny_params, tokens, small_cfg):
    jitted = jax.jit(models.forward)(tiny_params, tokens, small_cfg)
    np.testing.assert_allclose(jitted, models.forward(tiny_params, tokens, small_cfg), atol=1e-5)


def test_the_model_is_causal(tiny_params, tokens, small_cfg):
    changed = tokens.at[:, 10:].set(0)
    a, b = (
        models.forward(tiny_params, tokens, small_cfg),
        models.forward(tiny_params, changed, small_cfg),
    )
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_eval_is_deterministic_and_dropout_follows_the_key(tiny_params, tokens):
    cfg = GPTConfig(
        vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1
    )
    forward = jax.jit(models.forward)
    evals = [forward(tiny_params, tokens, cfg) for _ in range(2)]
    np.testing.assert_array_equal(*evals)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    train1 = forward(tiny_params, tokens, cfg, key=k1)
    np.testing.assert_array_equal(train1, forward(tiny_params, tokens, cfg, key=k1))
    assert not np.allclose(train1, forward(tiny_params, tokens, cfg, key=k2))
    assert not np.allclose(train1, evals[0])
    no_drop = cfg.replace(drop_rate=0.0)
    np.testing.assert_array_equal(
        forward(tiny_params, tokens, no_drop, key=k1),
        forward(tiny_params, tokens, no_drop),
    )


def test_too_long_an_input_is_a_clear_error(tiny_params, small_cfg):
    with pytest.raises(ValueError, match="exceed the context length of 32"):
        models.forward(tiny_params, jnp.zeros((1, 33), jnp.int32), small_cfg)
