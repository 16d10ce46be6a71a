# %% [markdown]
# # Lab design: functional and object-oriented, side by side through the workbook
#
# A bonus to chapter 5. Every stage of the book done twice, in a few lines each: the library's
# functions over a params dict, and the Flax NNX twin (`gptflax.nnx_model`), whose modules own
# their parameters as PyTorch's do. Each pair is checked equal, then timed in the same run:
# pretraining (§5.2), KV-cache decoding, chapter 6's new head and frozen layers, appendix E's
# LoRA, sharding on 8 simulated devices (appendix A.9.3), and checkpoints (§5.4). A closing table
# counts each design's lines and says what it made easy or hard.
# GPTFLAX_QUICK=1 uses a tiny model instead of the 124M one.

# %%
print("\n# Setup: 8 simulated devices, the model, the-verdict's batches")
import jax

jax.config.update("jax_num_cpu_devices", 8)  # for the sharding section: before any JAX call
import ast
import inspect
import itertools
import shutil
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import PartitionSpec as P
from labkit import QUICK, run_dir

from gptflax import attention, files, generate, lora, models, nnx_model, parallel
from gptflax.checkpoint import load_checkpoint, save_checkpoint
from gptflax.config import GPT_CONFIG_124M, TINY
from gptflax.data import create_dataloader_v1
from gptflax.finetune import encode_padded, freeze, replace_out_head, spam_splits, trainable_mask
from gptflax.generate import generate_cached
from gptflax.lora import attach_lora, init_lora, lora_loss, lora_optimizer
from gptflax.losses import classification_loss, cross_entropy, loss_fn
from gptflax.nnx_model import GPTModel, add_lora, from_params, lora_params, stack_blocks, to_params
from gptflax.tokenizer import gpt2_tokenizer, text_to_token_ids
from gptflax.training import init_train_state, make_optimizer, train_step

RUNS = Path(run_dir("labdesign"))
cfg = (TINY if QUICK else GPT_CONFIG_124M.replace(context_length=256)).replace(drop_rate=0.0)
N_STEPS, BATCH_SIZE = (6, 2) if QUICK else (4, 2)
KEYS = dict(
    zip(["init", "dropout", "head", "lora"], jax.random.split(jax.random.key(123), 4), strict=True)
)
tokenizer = gpt2_tokenizer()
text = files.resolve("the-verdict.txt").read_text(encoding="utf-8")


def verdict_batches(cfg, n: int) -> list:
    """The first n (B, T) batches of the-verdict's windows, inputs and targets, in order."""
    loader = create_dataloader_v1(
        text, BATCH_SIZE, cfg.context_length, cfg.context_length, shuffle=False
    )
    return list(itertools.islice(itertools.cycle(loader.batches(0)), n))


params = models.init_params(KEYS["init"], cfg)
batches = verdict_batches(cfg, N_STEPS)
print(f"{cfg.n_layers} layers of width {cfg.emb_dim}, dropout off; {N_STEPS} batches {BATCH_SIZE}x"
      f"{cfg.context_length} on {jax.device_count()} devices")  # fmt: skip


class Run(NamedTuple):
    """What training with one design gave: losses, final params, and its times."""

    losses: list
    params: dict
    first_s: float  # the first call: compiling, unless an earlier design compiled the same step
    step_s: float  # median over the later steps
    host_ms: float  # least time until a call returns, before its result is ready: Python's


def train(design, batches) -> Run:
    """Run `design` = (step, state, params_of) over the batches; step(state, batch) returns
    (state, {"loss": ...})."""
    step, state, params_of = design
    losses, step_s, host_s = [], [], []
    for batch in batches:
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        host_s.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))  # waits for the step
        step_s.append(time.perf_counter() - t0)
    step_median = float(np.median(step_s[1:]))
    return Run(losses, params_of(state), step_s[0], step_median,
               1e3 * min(host_s[1:]))  # fmt: skip


def max_diff(a, b) -> float:
    """The largest |a - b| over two pytrees of the same structure."""
    return max(
        float(jnp.abs(x - y).max()) for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True)
    )


# %%
print("\n# §5.2 Pretraining: the library's train_step against nnx.Optimizer, same start")
tx = make_optimizer(4e-4, weight_decay=0.1)  # the book's AdamW
PARAMS_TOL = 1e-5  # |functional - NNX| params after the steps: 1/40 of one step's size


def functional_pretraining(cfg, params, tx):
    """The library's way: train_step maps (state, batch) to a new state, under jax.jit."""
    step = jax.jit(partial(train_step, key=KEYS["dropout"], loss=partial(loss_fn, cfg=cfg), tx=tx))
    return step, init_train_state(params, tx), lambda state: state.params


def lm_loss(model, batch):  # losses.loss_fn's NNX form
    inputs, targets = batch
    return cross_entropy(model(inputs), targets)


def nnx_train_step(loss_of, wrt=nnx.Param):
    """A step over (model, optimizer) that updates both in place, differentiating
    loss_of(model, batch) with respect to the `wrt` parameters only."""

    def step(model_and_optimizer, batch):
        model, optimizer = model_and_optimizer
        grad_fn = nnx.value_and_grad(loss_of, argnums=nnx.DiffState(0, wrt))
        loss, grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return model_and_optimizer, {"loss": loss}

    return step


nnx_lm_step = nnx.jit(nnx_train_step(lm_loss))


def nnx_pretraining(cfg, params, tx):
    """The NNX way: the model and its optimizer are objects, changed in place under nnx.jit."""
    model = from_params(cfg, params)
    state = (model, nnx.Optimizer(model, tx, wrt=nnx.Param))
    return nnx_lm_step, state, lambda s: to_params(s[0])


def split_merge_pretraining(cfg, params, tx):
    """The same NNX step under jax.jit: the objects cross the boundary as a pytree of arrays."""
    model = from_params(cfg, params)
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    nnx_step = nnx_train_step(lm_loss)

    @jax.jit
    def step(state, batch):
        model_and_optimizer, metrics = nnx_step(nnx.merge(graphdef, state), batch)
        return nnx.state(model_and_optimizer), metrics

    return step, state, lambda s: to_params(nnx.merge(graphdef, s)[0])


def cached_pretraining(cfg, params, tx):
    """nnx.jit with its walk over the objects done once (nnx.cached_partial), flax's answer."""
    model = from_params(cfg, params)
    state = (model, nnx.Optimizer(model, tx, wrt=nnx.Param))
    step = nnx.cached_partial(nnx_lm_step, state)
    return lambda _, batch: step(batch), state, lambda s: to_params(s[0])


DESIGNS = {
    "functional: jax.jit(train_step)": functional_pretraining,
    "NNX: nnx.jit": nnx_pretraining,
    "NNX: split/merge under jax.jit": split_merge_pretraining,
    "NNX: nnx.cached_partial": cached_pretraining,
}
runs = {name: train(make(cfg, params, tx), batches) for name, make in DESIGNS.items()}
fn_run = runs["functional: jax.jit(train_step)"]
loss_diff = max(max_diff(fn_run.losses, r.losses) for r in runs.values())
params_diff = max(max_diff(fn_run.params, r.params) for r in runs.values())
moved = max_diff(fn_run.params, params)
print(f"{'':34s}{'loss: first -> last':>22s}{'1st call':>10s}{'step':>10s}{'host':>10s}")
for name, r in runs.items():
    print(f"{name:34s}{r.losses[0]:12.4f} -> {r.losses[-1]:.4f}{r.first_s:9.2f}s"
          f"{r.step_s:9.3f}s{r.host_ms:8.2f}ms")  # fmt: skip
print(f"max |functional - NNX|: losses {loss_diff:.1e}, params {params_diff:.1e} after "
      f"{N_STEPS} steps (params moved up to {moved:.1e})")  # fmt: skip

# %%
print("\n# The Python overhead of nnx.jit per step, by model size")
# nnx.jit walks the model and optimizer objects on every call, before and after the compiled
# step: its cost grows with the number of Variables, not with the arithmetic. `host` is the
# time until a call returns, before its result is ready.


def n_variables(cfg) -> int:
    """How many parameter Variables the NNX twin of `cfg` has (AdamW adds two for each)."""
    return len(jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: GPTModel(cfg, rngs=nnx.Rngs(0))))))


TIMED = ["functional: jax.jit(train_step)", "NNX: nnx.jit", "NNX: nnx.cached_partial"]
SIZES = {"1 x 32": TINY.replace(n_layers=1), "4 x 32": TINY.replace(n_layers=4)}
if not QUICK:
    SIZES = {"2 x 32": TINY, "4 x 256": TINY.replace(n_layers=4, emb_dim=256)}
SIZES[f"{cfg.n_layers} x {cfg.emb_dim}"] = cfg  # measured above
overhead = {}
for size, size_cfg in sorted(SIZES.items(), key=lambda item: item[1].n_layers):
    if size_cfg is cfg:
        overhead[size] = {name: runs[name].host_ms for name in TIMED}
    else:
        size_cfg = size_cfg.replace(drop_rate=0.0)
        size_params = models.init_params(KEYS["init"], size_cfg)
        size_batches = verdict_batches(size_cfg, 8)
        overhead[size] = {name: train(DESIGNS[name](size_cfg, size_params, tx), size_batches)
                          .host_ms for name in TIMED}  # fmt: skip
    row = "  ".join(f"{name.split(': ')[1]} {ms:.2f}" for name, ms in overhead[size].items())
    print(f"{size} ({n_variables(size_cfg)} Variables): host ms {row}")

# %%
print("\n# KV-cache decoding: nnx.Cache variables against the library's functional cache")
MAX_NEW = 10 if QUICK else 40
prompts = ("Every effort moves you", "I had always thought")  # 4 tokens each
prompt = jnp.array([text_to_token_ids(t, tokenizer) for t in prompts])  # (2, 4)
trained = fn_run.params


@nnx.jit(static_argnames="max_new_tokens")
def nnx_greedy(model, prompt, max_new_tokens):
    """Prefill the cache with the prompt, then one token at a time: (B, T) -> (B, n) new ids."""
    logits = model(prompt)[:, -1]  # (B, V)
    out = jnp.zeros((prompt.shape[0], max_new_tokens), jnp.int32)

    def next_token(i, carry):
        model, logits, out = carry
        ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B,)
        return model, model(ids[:, None])[:, -1], out.at[:, i].set(ids)

    return nnx.fori_loop(0, max_new_tokens, next_token, (model, logits, out))[2]


def nnx_decoding(cfg, params, prompt, max_new_tokens):
    """The NNX way: the model holds its cache; each call continues where the last one ended."""
    model = from_params(cfg, params)
    model.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    return np.asarray(nnx_greedy(model, prompt, max_new_tokens))


def functional_decoding(cfg, params, prompt, max_new_tokens):
    """The library's way: the cache is a value threaded through one jitted loop."""
    return generate_cached(params, prompt, max_new_tokens, cfg)


decoded, tokens_per_s = {}, {}
for name, decode in (("functional", functional_decoding), ("NNX", nnx_decoding)):
    for _ in range(2):  # the second run is compiled
        t0 = time.perf_counter()
        decoded[name] = decode(cfg, trained, prompt, MAX_NEW)
        tokens_per_s[name] = decoded[name].size / (time.perf_counter() - t0)
    print(f"{name}: {tokens_per_s[name]:.1f} tokens/s; first row {decoded[name][0].tolist()}")

# %%
print("\n# §6.5 A new head and a frozen body: optax masks against NNX filters")
spam_texts, spam_labels = spam_splits()[0]
spam_tokens = encode_padded(spam_texts[:24], tokenizer, max_length=cfg.context_length)
spam_batches = [(spam_tokens[i : i + 8], spam_labels[i : i + 8]) for i in range(0, 24, 8)]


def functional_classifier(cfg, params, tx):
    """The library's way: a new head in the dict; a mask zeroes the frozen parameters' updates."""
    params = replace_out_head(params, KEYS["head"], num_classes=2)
    tx = optax.chain(tx, freeze(trainable_mask(params, n_last_blocks=1)))
    loss = partial(classification_loss, cfg=cfg, frozen_blocks=cfg.n_layers - 1)
    step = jax.jit(partial(train_step, key=KEYS["dropout"], loss=loss, tx=tx))
    return step, init_train_state(params, tx), lambda state: state.params


def last_token_loss(model, batch):  # §6.6: the class logits are the last position's
    tokens, labels = batch
    return cross_entropy(model(tokens)[:, -1], labels)


def nnx_classifier(cfg, params, tx, head):
    """The NNX way: assign a new head module; a filter picks what trains."""
    model = from_params(cfg, params)
    model.out_head = nnx.Linear(cfg.emb_dim, 2, rngs=nnx.Rngs(0))
    # the library's draw of the new head, so that both designs start equal:
    model.out_head.kernel[...], model.out_head.bias[...] = head["kernel"], head["bias"]
    last_block = nnx.PathContains(cfg.n_layers - 1)
    trainable = nnx.All(nnx.Param, nnx.Any(last_block, nnx.PathContains("final_norm"),
                                           nnx.PathContains("out_head")))  # fmt: skip
    state = (model, nnx.Optimizer(model, tx, wrt=trainable))
    return nnx.jit(nnx_train_step(last_token_loss, trainable)), state, lambda s: to_params(s[0])


def what_moved(before: dict, after: dict) -> dict:
    """Which parameters changed: per layer for the stacked blocks."""
    changed = jax.tree.map(lambda a, b: np.asarray(a != b), before, after)
    per_layer = jax.tree.map(lambda c: c.reshape(len(c), -1).any(1).tolist(),
                             changed.pop("trf_blocks"))  # fmt: skip
    return {**jax.tree.map(lambda c: bool(c.any()), changed), "trf_blocks": per_layer}


head_tx = make_optimizer(1e-3, weight_decay=0.1)
fn_design = functional_classifier(cfg, trained, head_tx)
classifier_start = fn_design[1].params
head_runs = {"functional": train(fn_design, spam_batches),
             "NNX": train(nnx_classifier(cfg, trained, head_tx, classifier_start["out_head"]),
                          spam_batches)}  # fmt: skip
moved_sets = {name: what_moved(classifier_start, r.params) for name, r in head_runs.items()}
mask = trainable_mask(classifier_start, n_last_blocks=1)
mask_set = what_moved(jax.tree.map(np.zeros_like, mask), mask)  # the 1s of the mask, read alike
head_loss_diff = max_diff(head_runs["functional"].losses, head_runs["NNX"].losses)
n_moved = sum(sum(v) if isinstance(v, list) else v for v in jax.tree.leaves(moved_sets["NNX"]))
print(f"the same parameters moved in both: {n_moved} arrays or layers of them; losses "
      f"{head_runs['NNX'].losses[0]:.4f} -> {head_runs['NNX'].losses[-1]:.4f} "
      f"(max |diff| {head_loss_diff:.1e})")  # fmt: skip

# %%
print("\n# Appendix E: nnx.LoRALinear against gptflax.lora (rank = alpha: NNX's LoRA has no alpha)")
RANK = ALPHA = 16
lora_tx = make_optimizer(1e-3, weight_decay=0.1)
# AdamW moves a parameter whose gradient is near zero by up to a whole step on a rounding
# difference (B starts at 0, so A's first gradients are ~0): a tenth of one step at lr 1e-3
LORA_TOL = 1e-4
lora_objective = lora_loss(partial(loss_fn, cfg=cfg), ALPHA, RANK)


def nnx_lora(cfg, params, tx):
    """The NNX way: swap every Linear for a LoRALinear; train what nnx.LoRAParam picks."""
    model = from_params(cfg, params)
    add_lora(model, RANK, rngs=nnx.Rngs(KEYS["lora"]))
    state = (model, nnx.Optimizer(model, tx, wrt=nnx.LoRAParam))
    step = nnx.jit(nnx_train_step(lm_loss, nnx.LoRAParam))
    return step, state, lambda s: lora_params(nnx.state(s[0], nnx.LoRAParam))


def functional_lora(params, lora, tx):
    """The library's way: LoRA params beside the frozen ones, an optimizer over those alone."""
    tx = lora_optimizer(tx)
    step = jax.jit(partial(train_step, key=KEYS["dropout"], loss=lora_objective, tx=tx))
    return step, init_train_state({"base": params, "lora": lora}, tx), lambda s: s.params["lora"]


@jax.jit
def library_probe(both: dict, batch) -> tuple:
    """The library's LoRA model on one batch: its logits, and the gradients of its LoRA params."""
    logits = models.forward(attach_lora(both["base"], both["lora"], ALPHA, RANK), batch[0], cfg)
    return logits, jax.grad(lora_objective)(both, *batch)["lora"]


@nnx.jit
def nnx_probe(model, batch) -> tuple:
    """The NNX LoRA model on one batch: the same two, in the library's names."""
    grads = nnx.grad(lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
    return model(batch[0]), lora_params(grads)


nnx_design = nnx_lora(cfg, trained, lora_tx)
lora_model = nnx_design[1][0]  # changed in place by each step
lora_start = nnx_design[2](nnx_design[1])  # NNX's draws of A (B = 0), for both designs
probes = {"init": (library_probe({"base": trained, "lora": lora_start}, batches[0]),
                   nnx_probe(lora_model, batches[0]))}  # fmt: skip
lora_runs = {"functional": train(functional_lora(trained, lora_start, lora_tx), batches),
             "NNX": train(nnx_design, batches)}  # fmt: skip
probes["trained"] = (library_probe({"base": trained, "lora": lora_runs["functional"].params},
                                   batches[0]), nnx_probe(lora_model, batches[0]))  # fmt: skip
lora_diffs = {  # when: [max |diff| of the logits, of the gradients]
    when: [max_diff(fn, nx) for fn, nx in zip(*pair, strict=True)] for when, pair in probes.items()
}
lora_grad_scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(probes["trained"][0][1]))
lora_loss_diff = max_diff(lora_runs["functional"].losses, lora_runs["NNX"].losses)
lora_params_diff = max_diff(lora_runs["functional"].params, lora_runs["NNX"].params)
library_draws = jax.eval_shape(partial(init_lora, rank=RANK), KEYS["lora"], trained)
same_lora_names = jax.tree.map(jnp.shape, library_draws) == jax.tree.map(jnp.shape, lora_start)
print(f"the library's init_lora adapts the same layers, in the same shapes: {same_lora_names}")
for when, (logits_diff, grads_diff) in lora_diffs.items():
    print(f"{when}: max |NNX - library| logits {logits_diff:.1e}, LoRA gradients {grads_diff:.1e}")
print(f"after {N_STEPS} steps: losses {lora_runs['NNX'].losses[0]:.4f} -> "
      f"{lora_runs['NNX'].losses[-1]:.4f} (max |diff| {lora_loss_diff:.1e}), LoRA params max "
      f"|diff| {lora_params_diff:.1e}; gradients up to {lora_grad_scale:.1e}")  # fmt: skip

# %%
print("\n# A.9.3 Sharding: nnx.with_partitioning annotations against the families' logical axes")
LOGICAL_NAMES = ("embed", "heads", "mlp", "vocab")  # every name the twin's annotations use


def functional_shardings(cfg, mesh, strategy):
    """The library's way: logical axes looked up from each param's path, mapped by rules."""
    abstract = jax.eval_shape(models.init_params, KEYS["init"], cfg)
    return parallel.shardings(abstract, cfg, mesh, strategy)


def nnx_shardings(cfg, mesh, strategy):
    """The NNX way: each param carries its axis names; rules map them onto the mesh."""
    model = nnx.eval_shape(lambda: GPTModel(cfg, rngs=nnx.Rngs(0)))
    rules = parallel.parse_strategy(strategy)
    with nnx.logical_axis_rules([(name, rules.get(name)) for name in LOGICAL_NAMES]):
        return nnx.to_pure_dict(nnx.get_named_sharding(nnx.state(model, nnx.Param), mesh))


def spec_table(shardings: dict) -> dict:
    """{"trf_blocks/att/W_query/kernel": {PartitionSpec}, ...}: NNX's per-block entries take the
    stacked params' leading layer axis (never split), one set over all blocks."""
    table = {}
    for path, sharding in jax.tree_util.tree_leaves_with_path(shardings):
        keys, spec = [str(p.key) for p in path], sharding.spec
        if keys[1].isdigit():
            keys, spec = [keys[0], *keys[2:]], P(None, *spec)
        table.setdefault("/".join(keys), set()).add(spec)
    return table


shard_cfg = cfg.replace(vocab_size=50304)  # GPT-2's vocabulary padded to split 8 ways (nanoGPT)
meshes = {"fsdp": parallel.make_mesh(data=8), "tp": parallel.make_mesh(data=1, model=8)}
same_specs, differing_at_50257 = {}, {}
for strategy, mesh in meshes.items():
    tables = [spec_table(f(shard_cfg, mesh, strategy)) for f in (functional_shardings,
                                                                  nnx_shardings)]  # fmt: skip
    same_specs[strategy] = tables[0] == tables[1]
    gpt2 = [spec_table(f(cfg, mesh, strategy)) for f in (functional_shardings, nnx_shardings)]
    differing_at_50257[strategy] = sorted(k for k in gpt2[0] if gpt2[0][k] != gpt2[1][k])
    print(
        f"{strategy}: equal PartitionSpecs for all {len(tables[0])} params: "
        f"{same_specs[strategy]}, e.g. W_query {tables[1]['trf_blocks/att/W_query/kernel']}"
    )
    print(f"  with GPT-2's 50,257 tokens they differ at {differing_at_50257[strategy]}")

# %%
print("\n# §5.4 Checkpoints: orbax with nnx.state against gptflax.checkpoint, each reading both")
shutil.rmtree(RUNS / "checkpoints", ignore_errors=True)
LIBRARY_DIR, NNX_DIR = RUNS / "checkpoints" / "library", RUNS / "checkpoints" / "nnx"


def functional_save_and_load(cfg, params):
    """The library's way: a numbered, checksummed checkpoint with the config beside the params."""
    save_checkpoint(LIBRARY_DIR, 1, params, cfg=cfg)
    return load_checkpoint(LIBRARY_DIR, cfg=cfg, params_like=jax.eval_shape(lambda: params))[0]


def nnx_save_and_load(cfg, model):
    """The NNX way (flax's guide): orbax saves nnx.state, restores into an abstract model."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(NNX_DIR.absolute(), nnx.state(model, nnx.Param))
    restored = nnx.eval_shape(lambda: GPTModel(cfg, rngs=nnx.Rngs(0)))
    with ocp.StandardCheckpointer() as checkpointer:
        nnx.update(restored, checkpointer.restore(NNX_DIR.absolute(),
                                                  nnx.state(restored, nnx.Param)))  # fmt: skip
    return restored


t0 = time.perf_counter()
library_restored = functional_save_and_load(cfg, trained)
checkpoint_s = {"functional": time.perf_counter() - t0}
t0 = time.perf_counter()
nnx_restored = nnx_save_and_load(cfg, from_params(cfg, trained))
checkpoint_s["NNX"] = time.perf_counter() - t0
# Each design reads the other's files: the library's through from_params, NNX's raw orbax tree
# (every Variable saved as {"value": array}) through its values, the blocks stacked.
nnx_from_library = from_params(cfg, load_checkpoint(
    LIBRARY_DIR, cfg=cfg, params_like=jax.eval_shape(lambda: trained))[0])  # fmt: skip
with ocp.StandardCheckpointer() as checkpointer:
    raw = checkpointer.restore(NNX_DIR.absolute())
library_from_nnx = stack_blocks(jax.tree.map(lambda v: v["value"], raw,
                                             is_leaf=lambda x: "value" in x))  # fmt: skip
checkpoint_diffs = {"library -> library": max_diff(library_restored, trained),
                    "NNX -> NNX": max_diff(to_params(nnx_restored), trained),
                    "library -> NNX": max_diff(to_params(nnx_from_library), trained),
                    "NNX -> library": max_diff(library_from_nnx, trained)}  # fmt: skip
print("max |restored - saved|:", checkpoint_diffs)
print(
    f"save and load: functional {checkpoint_s['functional']:.2f}s, NNX {checkpoint_s['NNX']:.2f}s"
)

# %%
print("\n# The two designs, stage by stage")
# Lines of code (no blank lines, comments or docstrings) of this lab's functions for each stage,
# and of the library's own functions that they call (gptflax only; flax and optax not counted).


def loc(*code) -> int:
    """Lines of code of functions and classes, without blank lines, comments and docstrings."""
    total = 0
    for c in code:
        source = textwrap.dedent(inspect.getsource(c))
        defs = [
            n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef | ast.ClassDef)
        ]
        docstrings = {i for n in defs if ast.get_docstring(n)
                      for i in range(n.body[0].lineno, n.body[0].end_lineno + 1)}  # fmt: skip
        code_lines = [line.strip() for i, line in enumerate(source.splitlines(), 1)
                      if i not in docstrings]  # fmt: skip
        total += sum(1 for line in code_lines if line and not line.startswith("#"))
    return total


def times(r: dict) -> str:
    return " / ".join(f"step {x.step_s:.3f}s, 1st call {x.first_s:.1f}s" for x in r.values())


twin_attention = nnx_model.MultiHeadAttention
STAGES = {  # stage: (functional: lab, library), (NNX: lab, library), measured, easy / hard
    "pretraining (§5.2)": (
        ((functional_pretraining,), (train_step, init_train_state, loss_fn)),
        ((lm_loss, nnx_train_step, nnx_pretraining), ()),
        times({name: runs[name] for name in list(DESIGNS)[:2]}),
        "NNX: torch-like in-place update; nnx.jit walks the objects at every call"),
    "KV-cache decoding": (
        ((functional_decoding,), (generate.generate_cached, generate._decode_with_cache,
          models.init_cache, models.hidden_cached, attention.init_kv_cache, attention.write_kv,
          attention.with_cache)),
        ((nnx_greedy, nnx_decoding), (GPTModel.init_cache, twin_attention.init_cache,
                                      twin_attention._write_cache)),
        f"{tokens_per_s['functional']:.0f} / {tokens_per_s['NNX']:.0f} tokens/s",
        "NNX: the cache is state the model keeps; functional: ragged rows, a tuned layout"),
    "new head, frozen body (§6.5)": (
        ((functional_classifier,), (replace_out_head, trainable_mask, freeze,
                                    classification_loss)),
        ((last_token_loss, nnx_classifier), ()),
        times(head_runs),
        "NNX: assign a module, a path filter; functional: a mask per stacked layer"),
    "LoRA (appendix E)": (
        ((functional_lora,), (lora.init_lora, lora._with_lora, lora.LoRAKernel, lora.attach_lora,
                              lora.lora_loss, lora.lora_optimizer)),
        ((nnx_lora,), (nnx_model.add_lora, nnx_model.LoRALinear, nnx_model.lora_params)),
        times(lora_runs),
        "NNX: surgery with flax's LoRALinear, but no alpha and renamed params"),
    "sharding (A.9.3)": (
        ((functional_shardings,), (parallel.shardings, parallel.parse_strategy,
          parallel.logical_axes, parallel._layer_axes, parallel.partition_spec)),
        ((nnx_shardings,), (nnx_model._named,)),
        "equal specs (fsdp, tp)",
        "NNX: names beside each param, but no check that a dimension splits evenly"),
    "checkpoints (§5.4)": (
        ((functional_save_and_load,), (save_checkpoint, load_checkpoint)),
        ((nnx_save_and_load,), ()),
        f"{checkpoint_s['functional']:.2f} / {checkpoint_s['NNX']:.2f} s save + load",
        "both orbax; the library adds config, checksums, atomic saves"),
}  # fmt: skip
lines_of = {stage: [(loc(*lab), loc(*lib)) for lab, lib in (fn, nx)]
            for stage, (fn, nx, _, _) in STAGES.items()}  # fmt: skip
print(
    "| stage | functional lines (lab + library) | NNX lines (lab + library) "
    "| functional / NNX, measured | easy / hard |\n|---|---|---|---|---|"
)
for stage, (_, _, measured, note) in STAGES.items():
    (fn_lab, fn_lib), (nnx_lab, nnx_lib) = lines_of[stage]
    print(f"| {stage} | {fn_lab} + {fn_lib} | {nnx_lab} + {nnx_lib} | {measured} | {note} |")
print("\nnnx.jit's Python overhead per step (ms until a call returns):")
print("| model | " + " | ".join(TIMED) + " |\n|---|---|---|---|")
for size, by_design in overhead.items():
    print(f"| {size} | " + " | ".join(f"{ms:.2f}" for ms in by_design.values()) + " |")

# %%
print("\n# Checks")
assert loss_diff < 1e-5 and params_diff < PARAMS_TOL and moved > 100 * PARAMS_TOL
nnx_jit_ms = [by_design["NNX: nnx.jit"] for by_design in overhead.values()]
for by_design in overhead.values():  # nnx.jit's walk costs more than jax.jit's dispatch
    assert by_design["NNX: nnx.jit"] > 1.5 * by_design["functional: jax.jit(train_step)"]
assert nnx_jit_ms[-1] > nnx_jit_ms[0]  # and grows with the number of Variables
assert np.array_equal(decoded["functional"], decoded["NNX"])
assert decoded["NNX"].shape == (2, MAX_NEW)
assert moved_sets["functional"] == moved_sets["NNX"] == mask_set  # what trained is what the
assert head_loss_diff < 1e-5  # mask lets train, in both designs
assert same_lora_names and lora_loss_diff < 1e-5 and lora_params_diff < LORA_TOL
for logits_diff, grads_diff in lora_diffs.values():  # at init and after training
    assert logits_diff < 1e-4 and grads_diff < 1e-4 * lora_grad_scale
assert all(same_specs.values())
assert differing_at_50257 == {"fsdp": [], "tp": ["out_head/kernel", "tok_emb/embedding"]}
assert all(d == 0.0 for d in checkpoint_diffs.values())  # both designs read each other's files
print("lab design: all checks passed")
