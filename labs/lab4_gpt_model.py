# %% [markdown]
# # Lab 4: implementing a GPT model from scratch (chapter 4)
#
# Layer norm, GELU, the feed-forward network, shortcut connections, the transformer block and the
# whole 124M-parameter GPT, as pure functions over a params pytree; then the same model as Flax NNX
# modules, side by side: equal outputs, and what each design costs to run.
# GPTFLAX_QUICK=1 builds a tiny model instead of the 124M one (parameter counts are exact anyway).

# %% §4.1 The configuration of the 124M model
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from gptflax import model, nn
from gptflax.config import GPT_CONFIG_124M, TINY
from gptflax.generate import generate_text_simple
from gptflax.nnx_model import from_params
from gptflax.tokenizer import gpt2_tokenizer, text_to_token_ids, token_ids_to_text

QUICK = os.environ.get("GPTFLAX_QUICK") == "1"
RUNS = "runs/quick/lab4" if QUICK else "runs/lab4"  # quick runs leave full runs alone
os.makedirs(RUNS, exist_ok=True)
cfg = TINY if QUICK else GPT_CONFIG_124M
print(GPT_CONFIG_124M)
print("this run builds:", cfg)

tokenizer = gpt2_tokenizer()
batch = jnp.array(
    [text_to_token_ids(t, tokenizer) for t in ("Every effort moves you", "Every day holds a")]
)
print(batch)  # (2, 4)

# %% §4.2 Layer normalization: zero mean, unit variance, then a learned scale and shift
batch_example = jax.random.normal(jax.random.key(123), (2, 5))
hidden = jax.nn.relu(nn.linear(nn.init_linear(jax.random.key(2), 5, 6), batch_example))
normed = nn.layer_norm(nn.init_layer_norm(6), hidden)
print("mean:", normed.mean(-1), "variance:", normed.var(-1))

# %% §4.3 GELU and the feed-forward network
x = jnp.linspace(-3, 3, 100)
fig, axes = plt.subplots(1, 2, figsize=(8, 3))
for ax, (name, y) in zip(axes, [("GELU", nn.gelu(x)), ("ReLU", jax.nn.relu(x))], strict=True):
    ax.plot(x, y)
    ax.set_title(f"{name} activation function")
    ax.grid(True)
fig.tight_layout()
fig.savefig(f"{RUNS}/gelu_relu.png")
ff_params = model.init_feed_forward(jax.random.key(0), 768)
print("feed-forward:", model.feed_forward(ff_params, jnp.ones((2, 3, 768))).shape)  # (2, 3, 768)


# %% §4.4 Shortcut connections keep gradients from vanishing
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

# %% §4.5 The transformer block: attention and feed-forward, each behind layer norm and a shortcut
block_params = model.init_block(jax.random.key(123), GPT_CONFIG_124M)
block_in = jax.random.uniform(jax.random.key(1), (2, 4, 768))
block_out = model.block(block_params, block_in, GPT_CONFIG_124M)
print("block:", block_in.shape, "->", block_out.shape)

# %% §4.6 The GPT model; parameter count and memory without allocating (jax.eval_shape)
shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), GPT_CONFIG_124M))
total_params = model.count_params(shapes)
head_params = model.count_params(shapes["out_head"])
print(f"Total number of parameters: {total_params:,}")
print("Token embedding layer shape:", shapes["tok_emb"]["embedding"].shape)
print("Output layer shape:", shapes["out_head"]["kernel"].shape)
print(f"Parameters with the output layer tied to the embedding: {total_params - head_params:,}")
print(f"Total size of the model: {total_params * 4 / 1024**2:.2f} MB")
print("Stacked block leaves, e.g. att.W_query:", shapes["trf_blocks"]["att"]["W_query"]["kernel"])

params = model.init_params(jax.random.key(123), cfg)
forward = jax.jit(model.forward)
logits = forward(params, batch, cfg)
print("Input batch:", batch.shape, "Output shape:", logits.shape)  # (2, 4, 50257)
# The book loops over the blocks in Python; gptflax scans over them, stacked. Same numbers:
loop_logits = model.forward_loop(params, batch, cfg)
scan_loop_diff = float(jnp.abs(logits - loop_logits).max())
print("max |scan - loop|:", scan_loop_diff)

# %% §4.7 Generating text: greedy decoding, one token at a time
encoded = np.array([text_to_token_ids("Hello, I am", tokenizer)])
out = generate_text_simple(params, encoded, 6, cfg.context_length, cfg)
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
    book_out = generate_text_simple(book_params, encoded, 6, 1024, GPT_CONFIG_124M)[0].tolist()
    print("with the book's seed-123 PyTorch weights:", book_out)
except ImportError:
    book_out = None
    print("torch / llms-from-scratch not installed (make setup-torch): book tokens not compared")

# %% Functional vs NNX, side by side: the same params in both designs compute the same logits
twin = from_params(cfg, params)
twin_logits = twin(batch)
twin_diff = float(jnp.abs(twin_logits - logits).max())
print("max |functional - NNX| logits:", twin_diff)


# %% Three ways to run the NNX model under jit, against the functional model
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

# %% Checks
assert total_params == 163_009_536 and total_params - head_params == 124_412_160
assert round(total_params * 4 / 1024**2, 2) == 621.83
np.testing.assert_allclose(normed.mean(-1), 0.0, atol=1e-6)
np.testing.assert_allclose(normed.var(-1), 1.0, rtol=1e-3)
assert shortcut[0] > 10 * plain[0]  # without shortcuts the first layer's gradient vanishes
assert block_out.shape == block_in.shape == (2, 4, 768)
assert logits.shape == (2, 4, 50257)
assert scan_loop_diff < 1e-4 and twin_diff < 1e-4
assert out.shape == (1, 10) and out[0, :4].tolist() == encoded[0].tolist()
assert book_out is None or book_out == book_tokens
print("lab 4: all checks passed")
