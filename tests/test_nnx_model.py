"""The Flax NNX twin computes what the functional model computes, shown three ways; and each
stage of the workbook done the NNX way agrees with the library's (lab design)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gptflax import models, parallel
from gptflax.checkpoint import load_checkpoint, save_checkpoint
from gptflax.config import GPTConfig
from gptflax.finetune import count_trainable, freeze, replace_out_head, trainable_mask
from gptflax.generate import generate_cached
from gptflax.lora import attach_lora, init_lora, lora_loss
from gptflax.losses import classification_loss, cross_entropy, loss_fn
from gptflax.nnx_model import (
    GPTModel,
    add_lora,
    from_params,
    lora_params,
    stack_blocks,
    to_params,
)
from gptflax.training import init_train_state, make_optimizer, train_step

pytestmark = pytest.mark.lab4

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0)
CFG_BIAS = CFG.replace(qkv_bias=True)


def batch(seed: int = 7):
    tokens = jax.random.randint(jax.random.key(seed), (4, 9), 0, CFG.vocab_size)
    return tokens[:, :-1], tokens[:, 1:]


def assert_trees_close(actual, desired, rtol: float, atol: float):
    jax.tree.map(partial(np.testing.assert_allclose, rtol=rtol, atol=atol), actual, desired)


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


@pytest.mark.labdesign
def test_adamw_steps_of_nnx_optimizer_and_of_train_step_give_equal_losses_and_params():
    tx = make_optimizer(4e-4, weight_decay=0.1)
    params = models.init_params(jax.random.key(0), CFG)
    step = jax.jit(
        partial(train_step, key=jax.random.key(1), loss=partial(loss_fn, cfg=CFG), tx=tx)
    )
    state = init_train_state(params, tx)

    def nnx_train(model, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(inputs), targets))(model)
        optimizer.update(model, grads)
        return loss

    twin = from_params(CFG, params)  # nnx.jit: the objects change in place
    optimizer = nnx.Optimizer(twin, tx, wrt=nnx.Param)
    nnx_step = nnx.jit(nnx_train)
    other = from_params(CFG, params)  # split/merge under jax.jit: a pytree in, a pytree out
    graphdef, nnx_state = nnx.split((other, nnx.Optimizer(other, tx, wrt=nnx.Param)))

    @jax.jit
    def split_merge_step(nnx_state, inputs, targets):
        model, optimizer = nnx.merge(graphdef, nnx_state)
        loss = nnx_train(model, optimizer, inputs, targets)
        return nnx.state((model, optimizer)), loss

    for seed in range(3):
        inputs, targets = batch(seed)
        state, metrics = step(state, (inputs, targets))
        nnx_loss = nnx_step(twin, optimizer, inputs, targets)
        nnx_state, split_merge_loss = split_merge_step(nnx_state, inputs, targets)
        np.testing.assert_allclose([nnx_loss, split_merge_loss], metrics["loss"], rtol=1e-6)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), state.params, params)
    assert min(jax.tree.leaves(moved)) > 0  # every leaf took steps
    for nnx_params in (to_params(twin), to_params(nnx.merge(graphdef, nnx_state)[0])):
        assert_trees_close(nnx_params, state.params, rtol=1e-5, atol=1e-6)


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


@pytest.mark.labdesign
def test_the_twin_decodes_from_its_nnx_cache_the_library_tokens_and_uncached_logits():
    params = models.init_params(jax.random.key(0), CFG)
    prompt, _ = batch()  # (4, 8)
    new = CFG.context_length - prompt.shape[1]
    twin = from_params(CFG, params)
    twin.init_cache(prompt.shape[0], CFG.context_length)
    last_logits = nnx.jit(lambda model, tokens: model(tokens)[:, -1])
    logits = [last_logits(twin, prompt)]  # prefill, then one token at a time
    tokens = []
    for _ in range(new):
        tokens.append(jnp.argmax(logits[-1], axis=-1))
        logits.append(last_logits(twin, tokens[-1][:, None]))
    tokens = np.stack(tokens, axis=1)  # (B, new)
    np.testing.assert_array_equal(tokens, generate_cached(params, prompt, new, CFG))
    uncached = from_params(CFG, params)(jnp.concatenate([prompt, tokens], axis=1))  # (B, T, V)
    np.testing.assert_allclose(
        np.stack(logits[:new], axis=1), uncached[:, prompt.shape[1] - 1 : -1], rtol=1e-5, atol=1e-5
    )


@pytest.mark.labdesign
def test_lora_linear_layers_compute_the_library_lora_and_its_gradients():
    rank = 4  # NNX's LoRA has no alpha: it is the library's with alpha = rank
    params = models.init_params(jax.random.key(0), CFG)
    inputs, targets = batch()
    objective = lora_loss(partial(loss_fn, cfg=CFG), rank, rank)

    @jax.jit
    def library_probe(lora):  # logits, and the gradients of the LoRA params
        logits = models.forward(attach_lora(params, lora, rank, rank), inputs, CFG)
        return logits, jax.grad(objective)({"base": params, "lora": lora}, inputs, targets)["lora"]

    def nnx_loss(model):
        return cross_entropy(model(inputs), targets)

    @nnx.jit
    def nnx_probe(model):
        grads = nnx.grad(nnx_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        return model(inputs), lora_params(grads)

    twin = from_params(CFG, params)
    add_lora(twin, rank, rngs=nnx.Rngs(1))
    initial = nnx.state(twin, nnx.LoRAParam)
    library_draws = jax.eval_shape(partial(init_lora, rank=rank), jax.random.key(1), params)
    assert shapes(lora_params(initial)) == shapes(library_draws)  # the same layers adapted
    b_leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(lora_params(initial))
                if path[-1].key == "B"]  # fmt: skip
    assert len(b_leaves) == 7 and not any(b.any() for b in b_leaves)  # 6 per block, the head
    noise = partial(jax.random.normal, jax.random.key(2))
    perturbed = jax.tree.map(lambda v: v + 0.05 * noise(v.shape), initial)  # B != 0
    for lora_state in (initial, perturbed):  # at initialisation (a no-op), and away from it
        nnx.update(twin, lora_state)
        (want_logits, want), (logits, got) = library_probe(lora_params(lora_state)), nnx_probe(twin)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
        assert_trees_close(got, want, rtol=1e-4, atol=1e-7)
    assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(want)) > 1e-4  # all of them


@pytest.mark.labdesign
def test_nnx_filters_train_what_the_optax_mask_trains():
    body = models.init_params(jax.random.key(0), CFG)
    params = replace_out_head(body, jax.random.key(1))
    mask = trainable_mask(params, n_last_blocks=1)
    tokens, labels = batch()[0], jnp.array([0, 1, 1, 0])
    tx = make_optimizer(1e-2, weight_decay=0.1)
    masked_tx = optax.chain(tx, freeze(mask))
    loss = partial(classification_loss, cfg=CFG)
    step = jax.jit(partial(train_step, key=jax.random.key(2), loss=loss, tx=masked_tx))
    state = init_train_state(params, masked_tx)

    twin = from_params(CFG, body)
    twin.out_head = nnx.Linear(CFG.emb_dim, 2, rngs=nnx.Rngs(0))  # §6.5's surgery
    twin.out_head.kernel[...], twin.out_head.bias[...] = (params["out_head"][k] for k in
                                                          ("kernel", "bias"))  # fmt: skip
    last, head, norm = (nnx.PathContains(p) for p in (CFG.n_layers - 1, "out_head", "final_norm"))
    trainable = nnx.All(nnx.Param, nnx.Any(last, head, norm))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(twin, trainable))) == count_trainable(
        params, mask
    )
    optimizer = nnx.Optimizer(twin, tx, wrt=trainable)

    @nnx.jit
    def nnx_step(model, optimizer):
        grad_fn = nnx.value_and_grad(
            lambda m: cross_entropy(m(tokens)[:, -1], labels), argnums=nnx.DiffState(0, trainable)
        )
        value, grads = grad_fn(model)
        optimizer.update(model, grads)
        return value

    for _ in range(2):
        state, metrics = step(state, (tokens, labels))
        np.testing.assert_allclose(nnx_step(twin, optimizer), metrics["loss"], rtol=1e-6)
    for after in (state.params, to_params(twin)):
        frozen = jax.tree.map(lambda a, b, m: float(jnp.abs((a - b) * (1 - m)).max()),
                              after, params, mask)  # fmt: skip
        trained = jax.tree.map(lambda a, b, m: float(jnp.abs((a - b) * m).max()),
                               after, params, mask)  # fmt: skip
        assert max(jax.tree.leaves(frozen)) == 0.0  # nothing outside the mask moved
        on = [t for t, m in zip(jax.tree.leaves(trained), jax.tree.leaves(mask), strict=True)
              if m.any()]  # fmt: skip
        assert len(on) == 17 and min(on) > 0  # 13 block leaves, final norm's 2, head's 2
    # AdamW moves a weight by up to lr a step whatever its gradient's size. Where a gradient is
    # near Adam's eps (1e-8), float32 rounding in either compiled program shifts that fraction:
    # measured up to 1.7e-6 in 2 steps. Allowed: 1e-4 of the 2 steps' reach, 2 * lr.
    assert_trees_close(to_params(twin), state.params, rtol=1e-5, atol=1e-4 * 2 * 1e-2)


@pytest.mark.labdesign
@pytest.mark.parametrize("strategy, data, model", [("fsdp", 8, 1), ("tp", 1, 8), ("fsdp+tp", 4, 2)])
def test_partitioning_annotations_give_the_library_shardings(strategy, data, model):
    cfg = CFG.replace(vocab_size=96)  # every split dimension divides by 8
    mesh = parallel.make_mesh(data=data, model=model)
    abstract = jax.eval_shape(models.init_params, jax.random.key(0), cfg)
    want = jax.tree.map(lambda s: s.spec, parallel.shardings(abstract, cfg, mesh, strategy))
    rules = parallel.parse_strategy(strategy)
    twin = nnx.eval_shape(lambda: GPTModel(cfg, rngs=nnx.Rngs(0)))
    with nnx.logical_axis_rules([(n, rules.get(n)) for n in ("embed", "heads", "mlp", "vocab")]):
        specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(twin, nnx.Param)))
    for i in range(cfg.n_layers):  # a block's spec, and the stacked layer axis, never split
        assert jax.tree.map(lambda s: P(None, *s), specs["trf_blocks"][i]) == want["trf_blocks"]
    assert {**specs, "trf_blocks": None} == {**want, "trf_blocks": None}
    assert want["trf_blocks"]["att"]["W_query"]["kernel"] != P(None, None, None)  # it splits


@pytest.mark.labdesign
def test_each_design_restores_the_other_designs_checkpoint(tmp_path):
    params = models.init_params(jax.random.key(0), CFG)
    twin = GPTModel(CFG, rngs=nnx.Rngs(1))
    save_checkpoint(tmp_path / "library", 1, params, cfg=CFG)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "nnx", nnx.state(twin, nnx.Param))

    like = jax.eval_shape(lambda: params)
    library_params = load_checkpoint(tmp_path / "library", cfg=CFG, params_like=like)[0]
    assert_trees_close(to_params(from_params(CFG, library_params)), params, rtol=0, atol=0)
    with ocp.StandardCheckpointer() as checkpointer:  # NNX's, as a plain tree: {"value": ...}
        raw = checkpointer.restore(tmp_path / "nnx")  # for each Variable, blocks numbered
    nnx_params = stack_blocks(
        jax.tree.map(lambda v: v["value"], raw, is_leaf=lambda x: "value" in x)
    )
    assert_trees_close(nnx_params, to_params(twin), rtol=0, atol=0)
    restored = nnx.eval_shape(lambda: GPTModel(CFG, rngs=nnx.Rngs(0)))  # flax's guide's way
    with ocp.StandardCheckpointer() as checkpointer:
        nnx.update(restored, checkpointer.restore(tmp_path / "nnx", nnx.state(restored, nnx.Param)))
    assert_trees_close(to_params(restored), to_params(twin), rtol=0, atol=0)
