# %% [markdown]
# # Lab 4: implementing a GPT model from scratch (chapter 4)
#
# Layer norm, GELU, the feed-forward network, shortcut connections, the transformer block and the
# whole 124M-parameter GPT, each written inline here in the chapter's order and checked against
# `gptflax.gpt`; then the same model as Flax NNX modules, side by side: equal outputs, and what
# each design costs to run.
# GPTFLAX_QUICK=1 builds a tiny model instead of the 124M one (parameter counts are exact anyway).

# %%
print("\n# §4.1 The configuration of the 124M model")
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from labkit import QUICK, run_dir

from gptflax import models, nn
from gptflax.attention import multi_head_attention
from gptflax.config import GPT2_PRESETS, GPT_CONFIG_124M, TINY
from gptflax.generate import generate
from gptflax.models import gpt
from gptflax.nnx_model import from_params
from gptflax.tokenizer import gpt2_tokenizer, text_to_token_ids, token_ids_to_text

RUNS = run_dir("lab4")  # runs/lab4, or runs/quick/lab4 in quick mode
cfg = TINY if QUICK else GPT_CONFIG_124M
print("the book's 124M config:", GPT_CONFIG_124M)
if QUICK:
    print("quick mode builds a tiny one:", cfg)

tokenizer = gpt2_tokenizer()
batch = jnp.array(
    [text_to_token_ids(t, tokenizer) for t in ("Every effort moves you", "Every day holds a")]
)
print("token ids of the two texts, (2, 4):\n", batch)


# %%
print("\n# §4.2 Layer normalization: zero mean, unit variance, then a learned scale and shift")


def layer_norm(params, x, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)  # biased variance, as the book (unbiased=False)
    return params["scale"] * (x - mean) / jnp.sqrt(var + eps) + params["shift"]


batch_example = jax.random.normal(jax.random.key(123), (2, 5))
layer_out = jax.nn.relu(nn.linear(nn.init_linear(jax.random.key(2), 5, 6), batch_example))
normed = layer_norm(nn.init_layer_norm(6), layer_out)  # (2, 6)
np.set_printoptions(precision=4, suppress=True)
print("mean per row:", np.asarray(normed.mean(-1)), "variance per row:", np.asarray(normed.var(-1)))
norm_diff = float(jnp.abs(normed - nn.layer_norm(nn.init_layer_norm(6), layer_out)).max())
print("max |ours - nn.layer_norm|:", norm_diff)


# %%
print("\n# §4.3 GELU and the feed-forward network")


def gelu(x):  # GPT-2's tanh approximation
    return 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * x**3)))


def feed_forward(params, x):  # (B, T, D) -> (B, T, 4D) -> (B, T, D)
    return nn.linear(params["fc2"], gelu(nn.linear(params["fc1"], x)))


x = jnp.linspace(-3, 3, 100)
fig, axes = plt.subplots(1, 2, figsize=(8, 3))
for ax, (name, y) in zip(axes, [("GELU", gelu(x)), ("ReLU", jax.nn.relu(x))], strict=True):
    ax.plot(x, y)
    ax.set_title(f"{name} activation function")
    ax.grid(True)
fig.tight_layout()
fig.savefig(f"{RUNS}/gelu_relu.png")
ff_params = gpt.init_feed_forward(jax.random.key(0), 768)
ff_in = jax.random.uniform(jax.random.key(1), (2, 3, 768))
ff_out = feed_forward(ff_params, ff_in)
gelu_diff = float(jnp.abs(gelu(x) - nn.gelu(x)).max())
ff_diff = float(jnp.abs(ff_out - gpt.feed_forward(ff_params, ff_in)).max())
print("feed-forward:", ff_in.shape, "->", ff_out.shape)
print(f"max |ours - library|: GELU {gelu_diff:.1e}, feed-forward {ff_diff:.1e}")


# %%
print("\n# §4.4 Shortcut connections keep gradients from vanishing")


def deep_net_params(key, sizes=(3, 3, 3, 3, 3, 1)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [nn.init_linear(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def deep_net(params, x, use_shortcut):
    for layer in params:
        out = nn.gelu(nn.linear(layer, x))
        x = x + out if use_shortcut and x.shape == out.shape else out
    return x


def layer_grad_means(params, use_shortcut):
    sample, target = jnp.array([[1.0, 0.0, -1.0]]), jnp.array([[0.0]])
    grads = jax.grad(lambda p: jnp.mean((deep_net(p, sample, use_shortcut) - target) ** 2))(params)
    return [float(jnp.abs(g["kernel"]).mean()) for g in grads]


deep_params = deep_net_params(jax.random.key(123))
plain, shortcut = layer_grad_means(deep_params, False), layer_grad_means(deep_params, True)
for i, (g0, g1) in enumerate(zip(plain, shortcut, strict=True)):
    print(f"layer {i} mean |grad|: without shortcut {g0:.6f}   with shortcut {g1:.6f}")


# %%
print("\n# §4.5 The transformer block")
# Attention and feed-forward, each behind a layer norm and a shortcut.


def transformer_block(params, x, cfg):  # eval mode: dropout is the identity
    shortcut = x
    x = multi_head_attention(params["att"], layer_norm(params["norm1"], x), cfg.n_heads)
    x = x + shortcut
    shortcut = x
    return feed_forward(params["ff"], layer_norm(params["norm2"], x)) + shortcut


one_block = gpt.init_block(jax.random.key(123), GPT_CONFIG_124M)
block_in = jax.random.uniform(jax.random.key(1), (2, 4, 768))
block_out = transformer_block(one_block, block_in, GPT_CONFIG_124M)
library_out, _ = gpt.block(
    one_block, block_in, GPT_CONFIG_124M, layer=0, positions=jnp.arange(4)[None]
)  # the library's block also takes the positions (and a KV cache, for decoding)
block_diff = float(jnp.abs(block_out - library_out).max())
print(
    "block:", block_in.shape, "->", block_out.shape, f"; max |ours - gpt.block|: {block_diff:.1e}"
)

# %%
print("\n# §4.6 The GPT model; parameter count and memory without allocating (jax.eval_shape)")


def model_size(cfg) -> tuple[int, int, float]:
    """(parameters, parameters without the output head, float32 megabytes) of a GPT config."""
    shapes = jax.eval_shape(gpt.init_params, jax.random.key(0), cfg)  # shapes, no memory
    total = nn.count_params(shapes)
    return total, total - nn.count_params(shapes["out_head"]), total * 4 / 1024**2


shapes = jax.eval_shape(gpt.init_params, jax.random.key(0), GPT_CONFIG_124M)
total_params, tied_params, size_mb = model_size(GPT_CONFIG_124M)
print(f"Total number of parameters: {total_params:,}")
print("Token embedding layer shape:", shapes["tok_emb"]["embedding"].shape)
print("Output layer shape:", shapes["out_head"]["kernel"].shape)
print(f"Parameters with the output layer tied to the embedding: {tied_params:,}")
print(f"Total size of the model: {size_mb:.2f} MB")
print("Stacked block leaves, e.g. att.W_query:", shapes["trf_blocks"]["att"]["W_query"]["kernel"])
blocks = shapes["trf_blocks"]  # each leaf stacks the 12 blocks' arrays: count one block's share
att_params = nn.count_params(blocks["att"]) // GPT_CONFIG_124M.n_layers
ff_params = nn.count_params(blocks["ff"]) // GPT_CONFIG_124M.n_layers
biased = GPT_CONFIG_124M.replace(qkv_bias=True)
att_with_bias = nn.count_params(jax.eval_shape(gpt.init_block, jax.random.key(0), biased)["att"])
print(
    f"Exercise 4.1, one block: attention {att_params:,} ({att_with_bias:,} with qkv_bias), "
    f"feed-forward {ff_params:,} parameters"
)
sizes = {name: model_size(c) for name, c in GPT2_PRESETS.items()}  # Exercise 4.2
with_qkv_bias = {name: model_size(GPT2_PRESETS[name].replace(qkv_bias=True)) for name in sizes}
for name, (total, tied, mb) in sizes.items():
    print(
        f"GPT-2 {name}: {total:,} parameters, {tied:,} with the head tied, {mb:.2f} MB; "
        f"with qkv_bias (OpenAI's weights) {with_qkv_bias[name][0]:,} / {with_qkv_bias[name][1]:,}"
    )


def gpt_model(params, tokens, cfg):  # the book's GPTModel.forward, a Python loop over the blocks
    x = nn.embedding(params["tok_emb"], tokens)  # (B, T, D)
    x = x + nn.embedding(params["pos_emb"], jnp.arange(tokens.shape[1]))  # + (T, D)
    for i in range(cfg.n_layers):
        x = transformer_block(nn.block_params(params, i), x, cfg)
    return nn.linear(params["out_head"], layer_norm(params["final_norm"], x))  # (B, T, V)


params = models.init_params(jax.random.key(123), cfg)
forward = jax.jit(models.forward)
logits = forward(params, batch, cfg)
print("Input batch:", batch.shape, "Output shape:", logits.shape)  # (2, 4, 50257)
# gptflax stacks the blocks' params and scans over them (one block to compile). Same numbers:
scan_loop_diff = float(jnp.abs(logits - gpt_model(params, batch, cfg)).max())
print("max |our loop over blocks - models.forward|:", scan_loop_diff)


# %%
print("\n# §4.7 Generating text: greedy decoding, one token at a time")


def generate_text_simple(params, idx, max_new_tokens, context_size, cfg):  # the book's loop
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # crop to the supported context
        logits = forward(params, idx_cond, cfg)[:, -1, :]  # (B, V): the last position only
        idx_next = jnp.argmax(logits, axis=-1, keepdims=True)  # (B, 1)
        idx = jnp.concatenate([idx, idx_next], axis=1)  # (B, T + 1)
    return idx


encoded = np.array([text_to_token_ids("Hello, I am", tokenizer)])
out = np.asarray(generate_text_simple(params, encoded, 6, cfg.context_length, cfg))
library_out = generate(params, encoded, 6, cfg)  # KV cache, one compiled decoding loop
print("Output:", out.tolist(), "length:", out.shape[1])
print(repr(token_ids_to_text(out[0], tokenizer)), "(untrained: gibberish, as in the book)")
# The book's exact tokens come from its seed-123 PyTorch weights, which need torch to draw:
book_tokens = [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267]
try:
    import torch
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel

    from gptflax.weights import from_book_state_dict

    torch.manual_seed(123)
    book_model = BookGPTModel(GPT_CONFIG_124M.__dict__)
    book_state = {k: v.detach().numpy() for k, v in book_model.state_dict().items()}
    book_params = from_book_state_dict(book_state, GPT_CONFIG_124M)
    book_out = generate(book_params, encoded, 6, GPT_CONFIG_124M)[0].tolist()
    print("with the book's seed-123 PyTorch weights:", book_out)
except ImportError:
    book_out = None
    print("torch / llms-from-scratch not installed (make setup-torch): book tokens not compared")

# %%
print("\n# Functional vs NNX, side by side")
# The same params in both designs compute the same logits.
twin = from_params(cfg, params)
twin_logits = twin(batch)
twin_diff = float(jnp.abs(twin_logits - logits).max())
print("max |functional - NNX| logits:", twin_diff)


# %%
print("\n# Three ways to run the NNX model under jit, against the functional model")


def time_it(fn, *args, reps=5):
    """(first call incl. compile, min of reps) in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, min(times)


tokens = jax.random.randint(jax.random.key(0), (2, min(256, cfg.context_length)), 0, cfg.vocab_size)
graphdef, state = nnx.split(twin)


@nnx.jit
def nnx_forward(m, x):
    return m(x)


@jax.jit
def split_merge_forward(state, x):
    return nnx.merge(graphdef, state)(x)


rows = {
    "functional: jax.jit(forward)": time_it(forward, params, tokens, cfg),
    "NNX: nnx.jit(model call)": time_it(nnx_forward, twin, tokens),
    "NNX: split/merge under jax.jit": time_it(split_merge_forward, state, tokens),
}
print(f"\nforward of {tokens.shape} tokens, {cfg.n_layers} layers, on {jax.devices()[0]}:")
print(f"{'':34s}{'first call':>12s}{'min step':>12s}")
for name, (first, best) in rows.items():
    print(f"{name:34s}{first:11.3f}s{best * 1e3:10.1f}ms")

# %% [markdown]
# What each design makes easy or hard:
# - Functional: params are a plain dict, so `jax.jit`, `grad`, optax and orbax take them as they
#   are; stacking the blocks and scanning over them is natural, and compiles one block instead of
#   twelve. The price: every function takes params, config and keys explicitly.
# - NNX: modules own their params, like PyTorch, so building and changing a model (swapping a head,
#   freezing layers by filter) reads like the book. `nnx.jit` walks the object graph on every call,
#   which costs Python time per step for small models; `split`/`merge` under `jax.jit` moves that
#   cost outside the step, and a Python loop over `nnx.List` blocks unrolls them when compiling.

# %%
print("\n# Checks")
assert batch.tolist() == [[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]]
assert total_params == 163_009_536 and tied_params == 124_412_160
assert round(size_mb, 2) == 621.83
assert (att_params, ff_params) == (2_360_064, 4_722_432)
assert att_with_bias == 2_362_368
assert [round(sizes[n][2], 2) for n in ("355M", "774M", "1558M")] == [1549.58, 3197.56, 6247.68]
assert with_qkv_bias["124M"][1] == 124_439_808
assert with_qkv_bias["355M"][:2] == (406_286_336, 354_823_168)
np.testing.assert_allclose(normed.mean(-1), 0.0, atol=1e-6)
np.testing.assert_allclose(normed.var(-1), 1.0, rtol=1e-3)
assert norm_diff < 1e-5 and gelu_diff < 1e-6 and ff_diff < 1e-5 and block_diff < 1e-4
assert shortcut[0] > 10 * plain[0]  # without shortcuts the first layer's gradient vanishes
assert block_out.shape == block_in.shape == (2, 4, 768)
assert logits.shape == (2, 4, 50257)
assert scan_loop_diff < 1e-4 and twin_diff < 1e-4
assert out.shape == (1, 10) and out[0, :4].tolist() == encoded[0].tolist()
assert out.tolist() == library_out.tolist()  # the book's loop and the library's decoder agree
assert book_out is None or book_out == book_tokens
print("lab 4: all checks passed")
