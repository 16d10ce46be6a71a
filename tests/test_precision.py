"""bf16 mixed precision and fused attention agree with the float32 reference."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import checkpoint, models
from gptflax.losses import loss_fn, mixed_precision

pytestmark = pytest.mark.lab5


@pytest.fixture(scope="module")
def setup(small_cfg):
    cfg = small_cfg.replace(emb_dim=64, n_layers=3)
    params = models.init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, cfg.vocab_size)
    return cfg, params, tokens[:, :-1], tokens[:, 1:]


def flat(tree):
    return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(tree)])


def test_bf16_loss_and_gradients_follow_float32(setup):
    cfg, params, x, y = setup
    loss32 = partial(loss_fn, cfg=cfg)
    loss16 = mixed_precision(loss32)
    (v32, g32), (v16, g16) = (jax.value_and_grad(f)(params, x, y) for f in (loss32, loss16))
    assert v16.dtype == jnp.float32 and abs(float(v16) - float(v32)) < 0.01 * float(v32)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # master weights' dtype
    cosine = flat(g16) @ flat(g32) / (jnp.linalg.norm(flat(g16)) * jnp.linalg.norm(flat(g32)))
    assert float(cosine) > 0.99
    logits16 = models.forward(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), x, cfg)
    assert logits16.dtype == jnp.bfloat16  # the matmuls really ran in bf16


def test_fused_attention_computes_the_same_model(setup):
    cfg, params, x, y = setup
    fused = cfg.replace(fused_attention=True)
    np.testing.assert_allclose(
        models.forward(params, x, fused), models.forward(params, x, cfg), atol=2e-5
    )
    g_ref, g_fused = (jax.grad(loss_fn)(params, x, y, c) for c in (cfg, fused))
    np.testing.assert_allclose(flat(g_fused), flat(g_ref), atol=2e-5)


def test_fused_attention_refuses_dropout(small_cfg):
    with pytest.raises(ValueError, match="fused_attention has no attention dropout"):
        small_cfg.replace(drop_rate=0.1, fused_attention=True)


def test_a_checkpoint_loads_with_either_attention(setup, tmp_path):
    cfg, params, _, _ = setup
    checkpoint.save_checkpoint(tmp_path / "ckpt", 1, params, cfg=cfg)
    fused = cfg.replace(fused_attention=True)
    loaded, _, _ = checkpoint.load_checkpoint(tmp_path / "ckpt", cfg=fused, params_like=params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    with pytest.raises(checkpoint.CheckpointError, match="was saved for GPTConfig"):
        checkpoint.load_checkpoint(
            tmp_path / "ckpt", cfg=cfg.replace(n_layers=2), params_like=params
        )
