"""LoRA (appendix E): the appendix's parameter count, a no-op at initialisation, the low-rank
update equal to its explicit form, and training that moves only A and B."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import models, nn
from gptflax.config import GPT_CONFIG_124M
from gptflax.finetune import replace_out_head
from gptflax.lora import LoRAKernel, attach_lora, init_lora, lora_loss, lora_optimizer, merge_lora
from gptflax.losses import classification_loss
from gptflax.training import init_train_state, make_optimizer, train_step

pytestmark = pytest.mark.labE


def classifier(cfg):
    return replace_out_head(models.init_params(jax.random.key(0), cfg), jax.random.key(1))


def test_rank_16_on_the_124m_classifier_trains_2666528_parameters():
    lora = jax.eval_shape(lambda: init_lora(jax.random.key(0), classifier(GPT_CONFIG_124M), 16))
    assert nn.count_params(lora) == 2_666_528
    assert set(lora) == {"trf_blocks", "out_head"}  # every linear; no embeddings or norms
    assert set(lora["trf_blocks"]) == {"att", "ff"}


def test_a_fresh_adaptation_changes_nothing(small_cfg):
    params = classifier(small_cfg)
    lora = init_lora(jax.random.key(2), params, rank=4)
    bound = 1 / np.sqrt(4)
    a = lora["trf_blocks"]["att"]["W_query"]["A"]
    assert a.shape == (2, 32, 4) and float(jnp.abs(a).max()) <= bound
    assert not np.any(lora["trf_blocks"]["att"]["W_query"]["B"])
    merged = merge_lora(params, lora, alpha=8, rank=4)
    jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_merged_kernels_equal_the_explicit_low_rank_path(small_cfg):
    params = classifier(small_cfg)
    lora = init_lora(jax.random.key(2), params, rank=4)
    lora = jax.tree.map(lambda x: x + 0.1, lora)  # a trained-looking, nonzero B
    merged = merge_lora(params, lora, alpha=8, rank=4)
    x = jax.random.normal(jax.random.key(3), (3, 32))
    layer = jax.tree.map(lambda leaf: leaf[1], params["trf_blocks"]["ff"]["fc1"])
    low_rank = jax.tree.map(lambda leaf: leaf[1], lora["trf_blocks"]["ff"]["fc1"])
    explicit = nn.linear(layer, x) + (8 / 4) * (x @ low_rank["A"]) @ low_rank["B"]
    merged_layer = jax.tree.map(lambda leaf: leaf[1], merged["trf_blocks"]["ff"]["fc1"])
    np.testing.assert_allclose(nn.linear(merged_layer, x), explicit, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["tok_emb"]["embedding"], params["tok_emb"]["embedding"])


def test_side_by_side_training_form_equals_the_merged_form(small_cfg):
    params = classifier(small_cfg)
    lora = init_lora(jax.random.key(2), params, rank=4)
    lora = jax.tree.map(lambda x: x + 0.1, lora)  # nonzero B
    tokens, labels = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]]), jnp.array([0, 1])
    attached = attach_lora(params, lora, alpha=8, rank=4)
    kernel = attached["trf_blocks"]["ff"]["fc1"]["kernel"]
    assert isinstance(kernel, LoRAKernel) and kernel.shape == (2, 32, 128)  # stacked layers
    np.testing.assert_array_equal(kernel.w, params["trf_blocks"]["ff"]["fc1"]["kernel"])
    np.testing.assert_array_equal(kernel.a, 2 * lora["trf_blocks"]["ff"]["fc1"]["A"])  # alpha/r
    side_by_side, merged = (
        models.forward(p, tokens, small_cfg) for p in (attached, merge_lora(params, lora, 8, 4))
    )
    np.testing.assert_allclose(side_by_side, merged, rtol=1e-5, atol=1e-5)

    def merged_loss(both, x, y):  # the form the side-by-side one replaces
        base = jax.lax.stop_gradient(both["base"])
        return classification_loss(merge_lora(base, both["lora"], 8, 4), x, y, small_cfg)

    both = {"base": params, "lora": lora}
    loss = lora_loss(lambda p, x, y, key=None: classification_loss(p, x, y, small_cfg), 8, 4)
    got, want = jax.grad(loss)(both, tokens, labels), jax.grad(merged_loss)(both, tokens, labels)
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), got, want)


def test_training_moves_only_a_and_b(small_cfg):
    params = classifier(small_cfg)
    both = {"base": params, "lora": init_lora(jax.random.key(2), params, rank=4)}
    loss = lora_loss(lambda p, x, y, key=None: classification_loss(p, x, y, small_cfg), 8, 4)
    tx = lora_optimizer(make_optimizer(1e-2, weight_decay=0.1))
    state = init_train_state(both, tx)
    batch = (jnp.array([[1, 2, 3], [4, 5, 6]]), jnp.array([0, 1]))
    grads = jax.grad(loss)(both, *batch)
    assert not any(np.any(g) for g in jax.tree.leaves(grads["base"]))
    assert any(np.any(g) for g in jax.tree.leaves(grads["lora"]))
    new, _ = jax.jit(lambda s: train_step(s, batch, jax.random.key(0), loss=loss, tx=tx))(state)
    jax.tree.map(np.testing.assert_array_equal, new.params["base"], params)
    assert np.any(new.params["lora"]["out_head"]["B"])  # B left zero
    n_moments = sum(x.size for x in jax.tree.leaves(new.opt_state) if x.ndim)
    assert n_moments == 2 * nn.count_params(both["lora"])  # Adam state for LoRA only
