"""A second model family, defined here in a few lines, goes through everything the library does
for GPT: decoding with and without its cache, fit, checkpoints, a classification head, LoRA.

The toy family: token embeddings, then blocks that each add tanh(mean of the positions so far @ W),
a final layer norm; the output head is the library's. Its cache keeps each layer's inputs per
position in the library's KV cache, read with the library's visibility rule.
"""

import sys
from dataclasses import dataclass
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import attention, checkpoint, models, nn
from gptflax.config import Architecture
from gptflax.data import DataLoader
from gptflax.finetune import replace_out_head, trainable_mask
from gptflax.generate import generate, generate_cached
from gptflax.lora import init_lora, lora_loss, merge_lora
from gptflax.losses import classification_logits, classification_loss
from gptflax.training import fit, init_train_state, make_optimizer

pytestmark = pytest.mark.lab4


@jax.tree_util.register_static
@dataclass(frozen=True)
class ToyConfig(Architecture):
    vocab_size: int = 23
    context_length: int = 16
    emb_dim: int = 8
    n_layers: int = 2
    n_heads: int = 1
    n_kv_heads: int = 1

    @property
    def head_dim(self) -> int:
        return self.emb_dim  # the cache keeps a layer's whole input per position


LOGICAL_AXES = {
    "tok_emb/embedding": ("vocab", "embed"),
    "mix/kernel": ("embed", "mlp"),
    "scale": ("embed",),
    "shift": ("embed",),
    "out_head/kernel": ("embed", "vocab"),
}


def init_params(key, cfg):
    k_emb, k_mix, k_head = jax.random.split(key, 3)
    mix = jax.random.normal(k_mix, (cfg.n_layers, cfg.emb_dim, cfg.emb_dim)) / cfg.emb_dim**0.5
    return {
        "tok_emb": nn.init_embedding(k_emb, cfg.vocab_size, cfg.emb_dim),
        "trf_blocks": {"mix": {"kernel": mix}},
        "final_norm": nn.init_layer_norm(cfg.emb_dim),
        "out_head": nn.init_linear(k_head, cfg.emb_dim, cfg.vocab_size, bias=False),
    }


def embed(params, tokens, cfg, *, positions, key=None):
    return nn.embedding(params["tok_emb"], tokens)


def block(params, x, cfg, *, layer, positions, cache=None, key=None):
    seen = x[:, None]  # (B, 1, S, D): each position's input is its key and its value
    _, seen, seen_positions, cache = attention.with_cache(cache, seen, seen, positions)
    visible = attention.visible_keys(positions, seen_positions).astype(x.dtype)  # (B or 1, S, T)
    running_mean = visible @ seen[:, 0] / visible.sum(-1, keepdims=True)  # (B, S, D)
    return x + jnp.tanh(nn.linear(params["mix"], running_mean)), cache


def final_norm(params, x, cfg):
    return nn.layer_norm(params["final_norm"], x)


models.register("toy", ToyConfig, sys.modules[__name__])
CFG = ToyConfig()
PARAMS = init_params(jax.random.key(0), CFG)


def test_a_family_must_provide_the_whole_interface():
    half = ModuleType("half")
    half.init_params, half.final_norm = init_params, final_norm
    with pytest.raises(TypeError, match="lacks embed, block, LOGICAL_AXES"):
        models.register("half", ToyConfig, half)
    with pytest.raises(TypeError, match="no model family is registered for dict"):
        models.family({})
    with pytest.raises(TypeError, match="no model family is registered for dict"):
        models.config_to_dict({})  # a checkpoint cannot record a config of no family


@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "top_k": 5}])
def test_cached_decoding_gives_the_uncached_tokens(options):
    prompt = np.array([[3, 1, 4], [1, 5, 9]])
    key = jax.random.key(7)
    cached = generate(PARAMS, prompt, 10, CFG, key=key, **options)
    uncached = generate(PARAMS, prompt, 10, CFG, key=key, use_cache=False, **options)
    np.testing.assert_array_equal(cached, uncached)
    ragged = generate_cached(PARAMS, [[3, 1, 4], [2]], 6, CFG)
    alone = generate(PARAMS, [[2]], 6, CFG, use_cache=False)[0, 1:]
    np.testing.assert_array_equal(ragged[1], alone)


def test_fit_lowers_the_loss_and_checkpoints_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    windows = np.tile(np.arange(17) % 5, (32, 1)) + rng.integers(0, 2, (32, 1))  # learnable
    loader = DataLoader(windows[:, :-1], windows[:, 1:], batch_size=8, shuffle=True, seed=0)
    tx = make_optimizer(3e-2, weight_decay=0.0)
    state, history = fit(
        init_train_state(PARAMS, tx), loader, loader, CFG, tx, num_epochs=4,
        key=jax.random.key(0), eval_freq=4, eval_iter=2, checkpoint_dir=tmp_path,
    )  # fmt: skip
    assert history.train_losses[-1] < 0.5 * history.train_losses[0]
    assert np.isfinite(PARAMS["tok_emb"]["embedding"]).all()  # fit did not consume (donate) them
    cfg, params = checkpoint.load_model(tmp_path)
    assert cfg == CFG and checkpoint.read_meta(tmp_path)[1]["config"] == CFG
    jax.tree.map(np.testing.assert_array_equal, params, state.params)


def test_a_classification_head_freezing_and_lora_work_on_the_toy_family():
    params = replace_out_head(PARAMS, jax.random.key(1), num_classes=2)
    tokens, labels = jnp.array([[1, 2, 3], [4, 5, 6]]), jnp.array([0, 1])
    assert classification_logits(params, tokens, CFG).shape == (2, 2)
    mask = trainable_mask(params)  # the last block, the final norm and the head
    assert mask["trf_blocks"]["mix"]["kernel"].ravel().tolist() == [0, 1]
    grads = jax.grad(classification_loss)(params, tokens, labels, CFG, frozen_blocks=1)
    assert not np.any(grads["tok_emb"]["embedding"])  # below the frozen block: not computed
    assert not np.any(grads["trf_blocks"]["mix"]["kernel"][0])
    assert np.any(grads["trf_blocks"]["mix"]["kernel"][1])
    lora = init_lora(jax.random.key(2), params, rank=2)
    assert set(lora) == {"trf_blocks", "out_head"}
    jax.tree.map(np.testing.assert_array_equal, merge_lora(params, lora, 4, 2), params)
    loss = lora_loss(lambda p, x, y, key=None: classification_loss(p, x, y, CFG), 4, 2)
    lora_grads = jax.grad(loss)({"base": params, "lora": lora}, tokens, labels)
    assert any(np.any(g) for g in jax.tree.leaves(lora_grads["lora"]))
