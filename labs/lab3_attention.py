# %% [markdown]
# # Lab 3: coding attention mechanisms (chapter 3)
#
# From a weighted average of word vectors to the causal multi-head attention inside GPT, one step
# at a time on the chapter's six-token sentence "Your journey starts with one step". The chapter's
# intermediate forms (simplified, v1, v2, renormalised masking, the wrapper of heads) are written
# here; the final, fused multi-head attention is `gptflax.attention`'s, and the two must agree.

# %%
print("\n# §3.3.1 A simple self-attention mechanism without trainable weights")
import jax
import jax.numpy as jnp
import numpy as np

from gptflax import attention as A
from gptflax import nn

np.set_printoptions(precision=4, suppress=True)  # the book's 4 digits, without float32 noise

inputs = jnp.array(
    [
        [0.43, 0.15, 0.89],  # Your     (x^1)
        [0.55, 0.87, 0.66],  # journey  (x^2)
        [0.57, 0.85, 0.64],  # starts   (x^3)
        [0.22, 0.58, 0.33],  # with     (x^4)
        [0.77, 0.25, 0.10],  # one      (x^5)
        [0.05, 0.80, 0.55],  # step     (x^6)
    ]
)
query = inputs[1]  # the second token, "journey"
attn_scores_2 = jnp.array([jnp.dot(x_i, query) for x_i in inputs])
print("attention scores for query 2:", attn_scores_2)
attn_weights_2_tmp = attn_scores_2 / attn_scores_2.sum()  # the book's first try: sums to 1
print("normalised by their sum:", attn_weights_2_tmp)
naive_softmax = jnp.exp(attn_scores_2) / jnp.exp(attn_scores_2).sum()
attn_weights_2 = jax.nn.softmax(attn_scores_2)
print("attention weights:", attn_weights_2, "sum:", attn_weights_2.sum())
context_vec_2 = sum(attn_weights_2[i] * x_i for i, x_i in enumerate(inputs))
print("context vector 2:", context_vec_2)

# %%
print("\n# §3.3.2 Attention weights for all inputs at once: two matrix products")
attn_scores = inputs @ inputs.T  # (6, 6): the dot product of every pair of inputs
attn_weights = jax.nn.softmax(attn_scores, axis=-1)  # each row sums to 1
all_context_vecs = attn_weights @ inputs  # (6, 3)
print("attention weights, one row per query:\n", attn_weights)
print("row sums:", attn_weights.sum(axis=-1))
print("all context vectors:\n", all_context_vecs)

# %%
print("\n# §3.4 Self-attention with trainable weights: queries, keys and values")
d_in, d_out = inputs.shape[1], 2
key = jax.random.key(123)
k_q, k_k, k_v = jax.random.split(key, 3)  # v1: raw U(0, 1) matrices, like the book's
v1_params = {
    "W_query": jax.random.uniform(k_q, (d_in, d_out)),
    "W_key": jax.random.uniform(k_k, (d_in, d_out)),
    "W_value": jax.random.uniform(k_v, (d_in, d_out)),
}
query_2 = inputs[1] @ v1_params["W_query"]
keys = inputs @ v1_params["W_key"]
values = inputs @ v1_params["W_value"]
attn_scores_2 = query_2 @ keys.T  # the second query against every key
attn_weights_2 = jax.nn.softmax(attn_scores_2 / keys.shape[-1] ** 0.5)  # scaled by sqrt(d_k)
context_vec_2 = attn_weights_2 @ values
print("trainable-weight context vector 2:", context_vec_2)


def self_attention_v1(params, x):  # (T, d_in) -> (T, d_out)
    queries, keys, values = (x @ params[w] for w in ("W_query", "W_key", "W_value"))
    weights = jax.nn.softmax(queries @ keys.T / keys.shape[-1] ** 0.5, axis=-1)  # (T, T)
    return weights @ values


v1_out = self_attention_v1(v1_params, inputs)
print("SelfAttention_v1 output:\n", v1_out)

# %%
print("\n# §3.4.2 v2: linear layers (a better initialisation)")
# v1 given v2's weights gives v2's output.


def self_attention_v2(params, x):  # the same, with linear layers for W_query, W_key, W_value
    queries, keys, values = A.qkv(params, x)
    weights = jax.nn.softmax(queries @ keys.T / keys.shape[-1] ** 0.5, axis=-1)
    return weights @ values


v2_params = A.init_qkv(jax.random.key(789), d_in, d_out)
v2_out = self_attention_v2(v2_params, inputs)
v1_with_v2_weights = self_attention_v1({k: p["kernel"] for k, p in v2_params.items()}, inputs)
print("SelfAttention_v2 output:\n", v2_out)

# %%
print("\n# §3.5.1 Causal attention: hide future words, two ways")
queries, keys, _ = A.qkv(v2_params, inputs)
scores = queries @ keys.T / keys.shape[-1] ** 0.5
mask = jnp.tril(jnp.ones((6, 6), dtype=bool))  # True where a query may look: the past and itself
masked = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)  # softmax, then zero the future
weights_renorm = masked / masked.sum(axis=-1, keepdims=True)  # and renormalise the rows
weights_neg_inf = A.causal_softmax(scores)  # the library's way: -inf above the diagonal, softmax
print("causal attention weights:\n", weights_neg_inf)

# %%
print("\n# §3.5.2 Dropout on the attention weights: drop half, scale the rest by 2")
example = jnp.ones((6, 6))
dropped = nn.dropout(example, 0.5, jax.random.key(123))
print("dropout on a matrix of ones:\n", dropped)
print("dropped attention weights:\n", nn.dropout(weights_neg_inf, 0.5, jax.random.key(123)))

# %%
print("\n# §3.5.3 A compact causal attention over a batch")


def causal_attention(params, x, drop_rate=0.0, key=None):  # one head: (B, T, d_in) -> (B, T, d_out)
    queries, keys, values = A.qkv(params, x)
    scores = queries @ keys.swapaxes(-1, -2) / keys.shape[-1] ** 0.5  # (B, T, T)
    return nn.dropout(A.causal_softmax(scores), drop_rate, key) @ values


batch = jnp.stack([inputs, inputs])  # (2, 6, 3)
ca_params = A.init_qkv(jax.random.key(123), d_in, d_out)
context_vecs = causal_attention(ca_params, batch)
print("causal attention output shape:", context_vecs.shape)  # (2, 6, 2)

# %%
print("\n# §3.6.1 Stacking single heads: the multi-head wrapper")
num_heads = 2
heads = [A.init_qkv(k, d_in, d_out) for k in jax.random.split(jax.random.key(123), num_heads)]
wrapper_out = jnp.concatenate([causal_attention(h, batch) for h in heads], axis=-1)
print("wrapper output shape:", wrapper_out.shape)  # (2, 6, 4): the heads side by side

# %%
print("\n# §3.6.2 Multi-head attention with weight splits: one matmul per projection for all heads")
# Put the wrapper's heads side by side in one matrix per projection and skip the output
# projection (identity): the fused version must reproduce the wrapper exactly.
fused = {
    name: {"kernel": jnp.concatenate([h[name]["kernel"] for h in heads], axis=1)}
    for name in ("W_query", "W_key", "W_value")
}
fused["out_proj"] = {"kernel": jnp.eye(num_heads * d_out), "bias": jnp.zeros(num_heads * d_out)}
fused_out = A.multi_head_attention(fused, batch, num_heads)
mha_params = A.init_multi_head_attention(jax.random.key(123), d_in, d_out)
mha_out = A.multi_head_attention(mha_params, batch, n_heads=2)
print("multi-head attention output shape:", mha_out.shape)  # (2, 6, 2)
# A step further: the heads of the 124M GPT, 12 heads of 64 dims.
gpt_mha = A.init_multi_head_attention(jax.random.key(0), 768, 768)
print("GPT-2 sized attention:", A.multi_head_attention(gpt_mha, jnp.ones((1, 1024, 768)), 12).shape)

# %%
print("\n# Chapter 2's data loader into multi-head attention (the chapter's bonus notebook)")
from gptflax import files
from gptflax.data import create_dataloader_v1

raw_text = files.resolve("the-verdict.txt").read_text(encoding="utf-8")
loader = create_dataloader_v1(raw_text, batch_size=8, max_length=4, stride=4, shuffle=False)
token_ids, _ = next(iter(loader))  # (8, 4)
k_tok, k_pos, k_mha = jax.random.split(jax.random.key(123), 3)
tok_emb = nn.init_embedding(k_tok, 50257, 256)
pos_emb = nn.init_embedding(k_pos, 4, 256)
embeddings = nn.embedding(tok_emb, jnp.asarray(token_ids)) + nn.embedding(pos_emb, jnp.arange(4))
loader_mha = A.init_multi_head_attention(k_mha, 256, 256)
loader_context_vecs = A.multi_head_attention(loader_mha, embeddings, n_heads=2)  # (8, 4, 256)
print(embeddings.shape, "->", loader_context_vecs.shape)

# %%
print("\n# Checks: the book's values, and each derivation agrees with the library")
np.testing.assert_allclose(
    inputs @ query, [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865], atol=5e-5
)
np.testing.assert_allclose(
    attn_weights[1], [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581], atol=5e-5
)
np.testing.assert_allclose(
    attn_weights_2_tmp, [0.1455, 0.2278, 0.2249, 0.1285, 0.1077, 0.1656], atol=5e-5
)
np.testing.assert_allclose(naive_softmax, attn_weights[1], rtol=1e-6)
# fmt: off
np.testing.assert_allclose(all_context_vecs, [[0.4421, 0.5931, 0.5790], [0.4419, 0.6515, 0.5683],
                                              [0.4431, 0.6496, 0.5671], [0.4304, 0.6298, 0.5510],
                                              [0.4671, 0.5910, 0.5266], [0.4177, 0.6503, 0.5645]],
                           atol=5e-5)
# fmt: on
np.testing.assert_allclose(attn_weights.sum(-1), 1.0, rtol=1e-6)
np.testing.assert_allclose(context_vec_2, v1_out[1], rtol=1e-6)
np.testing.assert_allclose(v1_with_v2_weights, v2_out, rtol=1e-6)
np.testing.assert_allclose(weights_renorm, weights_neg_inf, rtol=1e-6, atol=1e-7)
assert bool(jnp.all(jnp.triu(weights_neg_inf, 1) == 0))
assert set(np.unique(np.asarray(dropped)).tolist()) <= {0.0, 2.0}
assert context_vecs.shape == (2, 6, 2) and wrapper_out.shape == (2, 6, 4)
np.testing.assert_allclose(fused_out, wrapper_out, rtol=1e-5, atol=1e-7)
assert mha_out.shape == (2, 6, 2)
assert embeddings.shape == loader_context_vecs.shape == (8, 4, 256)
print("lab 3: all checks passed")
