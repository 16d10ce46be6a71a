# %% [markdown]
# # Lab attention (bonus to chapter 4, the book's ch04/04-10): attention's alternatives
#
# Seven changes to the GPT of chapter 4, each a config field of `gptflax.config.GPTConfig`:
# grouped-query attention (GQA, `n_kv_groups`), sliding-window attention (SWA, `window`),
# multi-head latent attention (MLA, `latent_dim`), a mixture of experts (MoE, `num_experts`),
# Gated DeltaNet linear attention (`gated_deltanet`, mixed with full attention layers), and,
# since, cross-layer KV sharing (Gemma 4, `kv_shared_layers`) and DeepSeek sparse attention
# (DSA, `dsa_top_k`).
# Each is derived here in a few lines of NumPy and checked against the library; then every variant
# trains on the-verdict for the same steps and one table compares parameters, KV-cache bytes,
# speed and loss, with plots of the loss curves and of KV memory against context length.

# %%
import time

import jax
import jax.numpy as jnp
import numpy as np
from labkit import QUICK, run_dir

from gptflax import attention, files, models, sizes
from gptflax.config import GPTConfig
from gptflax.data import train_val_loaders
from gptflax.generate import generate
from gptflax.models import deltanet, gpt, mla, moe
from gptflax.plots import plot_series
from gptflax.training import fit, init_train_state, make_optimizer

RUNS = run_dir("labattention")
if QUICK:
    base = GPTConfig(context_length=32, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0)
else:
    base = GPTConfig(context_length=128, emb_dim=128, n_heads=8, n_layers=6, drop_rate=0.0)
d, h = base.emb_dim, base.n_heads
VARIANTS = {
    "GPT (MHA)": base,
    "GQA": base.replace(n_kv_groups=h // 4),  # 4 query heads per key/value head
    "SWA": base.replace(window=base.context_length // 8, full_attention_every=3),
    "MLA": base.replace(latent_dim=d // 4),  # 2D numbers per token and layer -> D/4
    "MoE": base.replace(num_experts=4, num_experts_per_tok=2, moe_hidden_dim=2 * d),
    "DeltaNet": base.replace(gated_deltanet=True, full_attention_every=3),  # 2 of every 3
    "KV sharing": base.replace(kv_shared_layers=base.n_layers // 2),  # the last half
    "DSA": base.replace(dsa_top_k=base.context_length // 8),  # each query reads 1/8 at most
}
rng = np.random.default_rng(0)
x = rng.normal(size=(1, 12, d)).astype(np.float32)
positions = jnp.arange(12)[None]


def softmax_attention(q, k, v, window=None, picked=True):
    """Causal attention per head, (H, T, Dh) each, the book's way; a window hides old keys, and
    `picked` (T, T) keeps only some."""
    t = q.shape[1]
    back = np.arange(t)[:, None] - np.arange(t)[None, :]
    sees = (back >= 0) & (back < (window or t)) & picked
    scores = np.where(sees, q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1]), -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def heads(a, n):  # (T, n * Dh) -> (n, T, Dh)
    return a.reshape(a.shape[0], n, -1).transpose(1, 0, 2)


def merge(a):  # (H, T, Dh) -> (T, H * Dh)
    return a.transpose(1, 0, 2).reshape(a.shape[1], -1)


def attention_params(cfg):
    p = gpt.init_attention(jax.random.key(1), cfg)
    return p, jax.tree.map(np.asarray, p)


# %%
print("\n# GQA and SWA: shared key/value heads, a window of recent keys (ch04/04_gqa, 06_swa)")
# G key/value heads each serve H / G query heads: repeat them and it is multi-head attention. The
# KV cache holds G heads. A sliding window of W lets a query see itself and W - 1 earlier keys.
diffs = {}
for name, cfg in (("GQA", VARIANTS["GQA"]), ("SWA", VARIANTS["SWA"])):
    p, n = attention_params(cfg)
    q = heads(x[0] @ n["W_query"]["kernel"], h)
    k, v = (np.repeat(heads(x[0] @ n[w]["kernel"], cfg.n_kv_heads), h // cfg.n_kv_heads, 0)
            for w in ("W_key", "W_value"))  # fmt: skip
    ours = merge(softmax_attention(q, k, v, cfg.window)) @ n["out_proj"]["kernel"]
    ours = ours + n["out_proj"]["bias"]
    lib = gpt.attention(p, x, cfg, layer=0, positions=positions)[0][0]
    diffs[name] = float(np.abs(ours - lib).max())
    print(f"{name}: max |inline - gpt.attention| {diffs[name]:.1e}")

# %%
print("\n# MLA: keys and values from one cached latent (ch04/05_mla)")
# c = x W_DKV (T, r) is all the cache keeps; the book up-projects it to keys and values. Decoding,
# the library absorbs W_UK into the queries and W_UV into out_proj and attends over c itself.
cfg = VARIANTS["MLA"]
p, n = attention_params(cfg)
latent = x[0] @ n["W_DKV"]["kernel"]
q, k, v = (heads(a, h) for a in (x[0] @ n["W_query"]["kernel"], latent @ n["W_UK"]["kernel"],
                                  latent @ n["W_UV"]["kernel"]))  # fmt: skip
ours = merge(softmax_attention(q, k, v)) @ n["out_proj"]["kernel"] + n["out_proj"]["bias"]
diffs["MLA"] = float(np.abs(ours - mla.absorbed(p, x, cfg, positions=positions)[0][0]).max())
print(f"MLA: max |inline (up-projected) - mla.absorbed| {diffs['MLA']:.1e}")

# %%
print("\n# MoE: each token through its top-k SwiGLU experts (ch04/07_moe)")
# The router scores E experts; a token goes through its k best, weighted by a softmax over those k
# scores. The library sorts the token-expert pairs by expert and runs `jax.lax.ragged_dot`.
cfg = VARIANTS["MoE"]
ff = moe.init_feed_forward(jax.random.key(2), cfg)
n = jax.tree.map(np.asarray, ff)
ours = np.zeros_like(x[0])
for i, token in enumerate(x[0]):
    logits = token @ n["gate"]["kernel"]
    top = np.argsort(-logits)[: cfg.num_experts_per_tok]
    weights = np.exp(logits[top] - logits[top].max())
    for e, w in zip(top, weights / weights.sum(), strict=True):
        fc1, fc2, fc3 = (n["experts"][f][e] for f in ("fc1", "fc2", "fc3"))
        gate = token @ fc1
        ours[i] += w * ((gate / (1 + np.exp(-gate)) * (token @ fc2)) @ fc3)  # SwiGLU
diffs["MoE"] = float(np.abs(ours - moe.feed_forward(ff, x, cfg)[0]).max())
print(f"MoE: max |inline - moe.feed_forward| {diffs['MoE']:.1e}")

# %%
print("\n# Gated DeltaNet: a fixed-size state instead of a KV cache (ch04/08_deltanet)")
# Per head, a (Dh, Dh) state S stands in for all earlier keys and values. Each token decays it by
# a = exp(g), reads what S recalls for its key, writes back b times the error, and is read out by
# its query: S <- a S; S <- S + k (b (v - S^T k))^T; o = S^T q. q, k and v first pass a short
# causal convolution (4 taps) and SiLU; q and k are L2-normed; the output is RMS-normed per head
# and gated by SiLU(x W_gate). The library trains with the chunked form of the same sums.
cfg = VARIANTS["DeltaNet"]
p = deltanet.init_layer(jax.random.key(3), cfg)
n = jax.tree.map(np.asarray, p)
silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
taps = n["conv1d"].shape[0]
qkv = np.stack([x[0] @ n[w]["kernel"] for w in ("W_query", "W_key", "W_value")], 1)  # (T, 3, D)
padded = np.concatenate([np.zeros((taps - 1, *qkv.shape[1:]), np.float32), qkv])
qkv = silu(sum(n["conv1d"][j] * padded[j : j + len(qkv)] for j in range(taps)))
q, k, v = (heads(qkv[:, i], h) for i in range(3))  # (H, T, Dh)
q = q / np.linalg.norm(q, axis=-1, keepdims=True) / np.sqrt(cfg.head_dim)
k = k / np.linalg.norm(k, axis=-1, keepdims=True)
b = 1 / (1 + np.exp(-(x[0] @ n["W_beta"]["kernel"])))  # (T, H)
g = -np.exp(n["A_log"]) * np.log1p(np.exp(x[0] @ n["W_alpha"]["kernel"] + n["dt_bias"]))
o = np.zeros_like(q)
for head in range(h):
    s = np.zeros((cfg.head_dim, cfg.head_dim), np.float32)
    for t in range(q.shape[1]):
        s = np.exp(g[t, head]) * s
        s = s + np.outer(k[head, t], b[t, head] * (v[head, t] - s.T @ k[head, t]))
        o[head, t] = s.T @ q[head, t]
o = o / np.sqrt((o * o).mean(-1, keepdims=True) + 1e-6) * n["head_norm"]["scale"]
o = merge(o) * silu(x[0] @ n["W_gate"]["kernel"])
ours = o @ n["out_proj"]["kernel"] + n["out_proj"]["bias"]
lib = deltanet.gated_deltanet(p, x, cfg, positions=positions)[0][0]  # the chunked form
diffs["DeltaNet"] = float(np.abs(ours - lib).max())
print(f"DeltaNet: max |inline recurrence - gated_deltanet (chunked)| {diffs['DeltaNet']:.1e}")

# %%
print("\n# KV sharing: later layers attend over an earlier layer's keys and values (Gemma 4)")
# The last n layers have queries only; each reads the keys and values of the last earlier layer
# of its kind, which are computed once. Those layers keep no cache at all.
cfg = VARIANTS["KV sharing"]
source, shared = cfg.kv_source(cfg.n_layers - 1), cfg.n_layers - 1
p = models.init_params(jax.random.key(4), cfg)
src, att = p["trf_blocks"][source]["att"], p["trf_blocks"][shared]["att"]
x_src = rng.normal(size=x.shape).astype(np.float32)  # what the source layer's attention read
k, v = (heads(x_src[0] @ np.asarray(src[w]["kernel"]), h) for w in ("W_key", "W_value"))
q = heads(x[0] @ np.asarray(att["W_query"]["kernel"]), h)
ours = merge(softmax_attention(q, k, v)) @ np.asarray(att["out_proj"]["kernel"])
ours = ours + np.asarray(att["out_proj"]["bias"])
empty = attention.init_kv_cache(1, h, 12, cfg.head_dim, jnp.float32)
kv = gpt.attention(src, x_src, cfg, layer=source, positions=positions, cache=empty)[1]
lib = gpt.attention(att, x, cfg, layer=shared, positions=positions, cache=kv)[0][0]
diffs["KV sharing"] = float(np.abs(ours - lib).max())
print(f"layer {shared} reads layer {source}'s keys: max |inline - gpt.attention| "
      f"{diffs['KV sharing']:.1e}; its attention has {sorted(att)} only")  # fmt: skip

# %%
print("\n# DSA: attention over the keys a lightning indexer picks (DeepSeek-V3.2)")
# A few small indexer heads score every earlier token: I_ts = sum_j w_tj ReLU(q_tj . k_s). Each
# query attends only to its top k. The choice passes no gradient, so the indexer learns from a
# loss of its own: the KL divergence from the attention's weights to the softmax of its scores.
cfg = VARIANTS["DSA"]
p, n = attention_params(cfg)
ix = n["indexer"]
q_index = (x[0] @ ix["W_query"]["kernel"]).reshape(12, cfg.indexer_heads, cfg.indexer_dim)
relu_dots = np.maximum(np.einsum("shd,td->sht", q_index, x[0] @ ix["W_key"]["kernel"]), 0)
scores = np.einsum("sh,sht->st", x[0] @ ix["W_weights"]["kernel"], relu_dots)  # (T, T)
scores = np.where(np.tril(np.ones((12, 12), bool)), scores, -np.inf)  # no later tokens
picked = np.zeros((12, 12), bool)
np.put_along_axis(picked, np.argsort(-scores, axis=-1)[:, : cfg.dsa_top_k], True, axis=-1)
q, k, v = (heads(x[0] @ n[w]["kernel"], h) for w in ("W_query", "W_key", "W_value"))
ours = merge(softmax_attention(q, k, v, picked=picked)) @ n["out_proj"]["kernel"]
ours = ours + n["out_proj"]["bias"]
lib = gpt.attention(p, x, cfg, layer=0, positions=positions)[0][0]
diffs["DSA"] = float(np.abs(ours - lib).max())
print(f"DSA: max |inline top-{cfg.dsa_top_k} attention - gpt.attention| {diffs['DSA']:.1e}")

# %%
print("\n# Training each variant on the-verdict, the same steps")
text = files.resolve("the-verdict.txt").read_text(encoding="utf-8")
text = text[:5000] if QUICK else text
train_loader, val_loader = train_val_loaders(text, base.context_length, batch_size=4)
EPOCHS, CONTEXT = (1, 32_768) if QUICK else (10, 32_768)
rows, curves, same_tokens = {}, {}, {}
for name, cfg in VARIANTS.items():
    params = models.init_params(jax.random.key(0), cfg)
    tx = make_optimizer(1e-3, weight_decay=0.1)
    t0 = time.perf_counter()
    state, history = fit(
        init_train_state(params, tx), train_loader, val_loader, cfg, tx, num_epochs=EPOCHS,
        key=jax.random.key(1), eval_freq=4, eval_iter=2,
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    ids = np.asarray(next(iter(val_loader))[0][:1, :8])
    new = 8 if QUICK else base.context_length - 8
    cached = generate(state.params, ids, new, cfg)  # compiles
    t0 = time.perf_counter()
    cached = generate(state.params, ids, new, cfg)
    decode_s = time.perf_counter() - t0
    same_tokens[name] = bool(
        (cached == generate(state.params, ids, new, cfg, use_cache=False)).all()
    )
    total, active = sizes.param_counts(params, cfg)
    rows[name] = {
        "params": total, "active": active,
        "KV B/token @32k": sizes.kv_bytes_per_token(cfg, CONTEXT),
        "train tok/s": EPOCHS * len(train_loader) * 4 * cfg.context_length / train_s,
        "decode tok/s": new / decode_s,
        "train loss": history.train_losses[-1], "val loss": history.val_losses[-1],
        "first train loss": history.train_losses[0],
    }  # fmt: skip
    curves[name] = (history.tokens_seen, history.val_losses)

print(f"{'variant':<10}" + "".join(f"{c:>16}" for c in list(rows["MoE"])[:-1]))
for name, row in rows.items():
    print(f"{name:<10}{row['params']:>16,}{row['active']:>16,}{row['KV B/token @32k']:>16,.0f}"
          f"{row['train tok/s']:>16,.0f}{row['decode tok/s']:>16,.0f}"
          f"{row['train loss']:>16.3f}{row['val loss']:>16.3f}")  # fmt: skip

seen = curves["GPT (MHA)"][0]
plot_series(seen, {k: v for k, (_, v) in curves.items()}, "tokens seen", "validation loss",
            f"{RUNS}/losses.png")  # fmt: skip
lengths = [2**k for k in range(8, 18)]
kv_mib = {k: [sizes.kv_cache_bytes(c, n) / 2**20 for n in lengths] for k, c in VARIANTS.items()}
plot_series(lengths, kv_mib, "context length (tokens)", "KV cache (MiB, bf16, batch 1)",
            f"{RUNS}/kv_memory.png")  # fmt: skip

# %%
print("\n# Checks")
assert all(diff < 1e-4 for diff in diffs.values()), diffs
assert all(same_tokens.values()), same_tokens  # cached greedy decoding = uncached, each variant
kv = {name: row["KV B/token @32k"] for name, row in rows.items()}
assert kv["GQA"] == kv["GPT (MHA)"] / 4 and kv["MLA"] == kv["GPT (MHA)"] / 8
assert kv["SWA"] < kv["GPT (MHA)"] / 2 and kv["MoE"] == kv["GPT (MHA)"]
assert kv["DeltaNet"] < kv["GPT (MHA)"] / 2  # a third of the layers keep keys and values
kept = base.n_layers - VARIANTS["KV sharing"].kv_shared_layers
assert kv["KV sharing"] == kv["GPT (MHA)"] * kept / base.n_layers
assert kv["DSA"] == kv["GPT (MHA)"] + base.n_layers * VARIANTS["DSA"].indexer_dim * 2
assert rows["MoE"]["active"] < rows["MoE"]["params"]
assert all(row["train loss"] < row["first train loss"] for row in rows.values())
print("lab attention: all checks passed")
