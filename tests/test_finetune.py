"""Classification fine-tuning pieces (Book §6.4-6.6): head surgery, freezing, last-token logits."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptflax import models, nn
from gptflax.config import GPT_CONFIG_124M
from gptflax.data import DataLoader
from gptflax.finetune import (
    calc_accuracy_loader,
    count_trainable,
    freeze,
    replace_out_head,
    trainable_mask,
)
from gptflax.losses import classification_logits, classification_loss, classifier_forward
from gptflax.nnx_model import GPTModel
from gptflax.training import make_optimizer

pytestmark = pytest.mark.lab6
KEY = jax.random.key(0)


def test_the_124m_classifier_trains_the_last_block_final_norm_and_head():
    def classifier():
        params = models.init_params(jax.random.key(0), GPT_CONFIG_124M)
        return replace_out_head(params, jax.random.key(1))

    params = jax.eval_shape(classifier)
    assert params["out_head"]["kernel"].shape == (768, 2) and params["out_head"]["bias"].shape == (
        2,
    )
    one_block = nn.count_params(params["trf_blocks"]) // 12
    expected = one_block + nn.count_params(params["final_norm"]) + 768 * 2 + 2
    assert count_trainable(params, trainable_mask(params)) == expected


def test_nnx_filters_count_the_same_trainable_parameters(small_cfg):
    params = replace_out_head(models.init_params(jax.random.key(0), small_cfg), jax.random.key(1))
    twin = GPTModel(small_cfg, rngs=nnx.Rngs(0))
    twin.out_head = nnx.Linear(small_cfg.emb_dim, 2, rngs=nnx.Rngs(1))  # the NNX head surgery
    last = small_cfg.n_layers - 1
    trainable = nnx.All(
        nnx.Param,
        nnx.Any(
            nnx.PathContains(last), nnx.PathContains("final_norm"), nnx.PathContains("out_head")
        ),
    )
    nnx_count = sum(x.size for x in jax.tree.leaves(nnx.state(twin, trainable)))
    assert nnx_count == count_trainable(params, trainable_mask(params)) > 0


def test_frozen_parameters_never_move_not_even_by_weight_decay(small_cfg):
    params = replace_out_head(models.init_params(jax.random.key(0), small_cfg), jax.random.key(1))
    mask = trainable_mask(params)
    tx = optax.chain(make_optimizer(1e-2, weight_decay=0.1), freeze(mask))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["tok_emb"]["embedding"], params["tok_emb"]["embedding"])
    w_old, w_new = (p["trf_blocks"]["att"]["W_query"]["kernel"] for p in (params, new))
    np.testing.assert_array_equal(w_new[:-1], w_old[:-1])  # earlier blocks frozen
    assert not np.allclose(w_new[-1], w_old[-1])  # the last block trains
    assert not np.allclose(new["out_head"]["kernel"], params["out_head"]["kernel"])


def test_last_real_token_logits_ignore_the_padding(small_cfg):
    params = replace_out_head(models.init_params(jax.random.key(0), small_cfg), jax.random.key(1))
    pad = 96
    tokens = jnp.array([[5, 6, 7, 8, 9], [10, 11, 12, pad, pad]])
    at_last_real = classification_logits(params, tokens, small_cfg, pad_token_id=pad)
    unpadded = classification_logits(params, tokens[1:, :3], small_cfg)  # the text alone
    np.testing.assert_allclose(at_last_real[1], unpadded[0], rtol=1e-5, atol=1e-6)
    book = classification_logits(params, tokens, small_cfg)  # the last position, padding and all
    np.testing.assert_allclose(book[0], at_last_real[0], rtol=1e-6)
    assert not np.allclose(book[1], at_last_real[1])
    labels = np.asarray(at_last_real.argmax(-1))
    right, wrong = (DataLoader(np.asarray(tokens), y, batch_size=1) for y in (labels, 1 - labels))
    assert calc_accuracy_loader(params, right, small_cfg, pad_token_id=pad) == 1.0
    assert calc_accuracy_loader(params, wrong, small_cfg, pad_token_id=pad) == 0.0


def test_frozen_blocks_change_no_value_and_only_drop_frozen_gradients(small_cfg):
    cfg = small_cfg.replace(n_layers=3)
    params = replace_out_head(models.init_params(jax.random.key(0), cfg), jax.random.key(1))
    tokens, labels = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]]), jnp.array([0, 1])
    np.testing.assert_allclose(
        classifier_forward(params, tokens, cfg, frozen_blocks=2),
        models.forward(params, tokens, cfg),
        rtol=1e-6,
        atol=1e-6,  # a GPU sums in another order: 1.4e-7 apart on an H100 (grads: 2.7e-8)
    )
    full = jax.grad(classification_loss)(params, tokens, labels, cfg)
    part = jax.grad(partial(classification_loss, frozen_blocks=2))(params, tokens, labels, cfg)
    w_full, w_part = (g["trf_blocks"]["ff"]["fc1"]["kernel"] for g in (full, part))
    assert not np.any(w_part[:2]) and np.abs(w_full[:2]).max() > 0
    np.testing.assert_allclose(w_part[2], w_full[2], rtol=1e-5, atol=1e-7)
    assert not np.any(part["tok_emb"]["embedding"])
    np.testing.assert_allclose(
        part["out_head"]["kernel"], full["out_head"]["kernel"], rtol=1e-5, atol=1e-7
    )
