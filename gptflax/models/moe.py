"""A mixture of experts (MoE; Book ch04/07_moe), the GPT's feed-forward when `cfg.num_experts`
is set.

A router (`gate`, D -> E, no bias) scores the experts for each token; the token goes through the
top k of them only, weighted by a softmax over their k logits (Mixtral's router, the book's), and
through the shared experts, if any (DeepSeek's), unweighted. Every expert is a SwiGLU feed-forward
(Llama's). Dispatch sorts the token-expert pairs by expert and multiplies each expert's rows with
`jax.lax.ragged_dot`, so only the chosen experts are computed (on a GPU a grouped matmul). In
training, the router's load-balancing loss (Switch Transformer's) joins the model's loss through
the gradient, as Megatron-LM's MoEAuxLossAutoScaler adds it: the forward pass is unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gptflax import nn
from gptflax.config import GPTConfig
from gptflax.models import llama

LOGICAL_AXES = {
    "gate/kernel": ("embed", None),  # (D, E)
    "experts/fc1": ("experts", "embed", "mlp"),  # (E, D, hidden)
    "experts/fc2": ("experts", "embed", "mlp"),
    "experts/fc3": ("experts", "mlp", "embed"),  # (E, hidden, D)
    "shared/fc2/kernel": ("embed", "mlp"),  # the shared experts' SwiGLU: as Llama's
    "fc3/kernel": ("mlp", "embed"),
}


def init_feed_forward(key: jax.Array, cfg: GPTConfig) -> dict:
    """The router, the experts' SwiGLU weights stacked along a leading expert axis (E, in, out),
    and the shared experts as one SwiGLU of num_shared_experts times the hidden size."""
    k_gate, k1, k2, k3, k_shared = jax.random.split(key, 5)
    e, d, hidden = cfg.num_experts, cfg.emb_dim, cfg.expert_hidden_dim

    def stacked(k, d_in, d_out):  # each expert as nn.init_linear draws it
        bound = 1.0 / math.sqrt(d_in)
        return jax.random.uniform(k, (e, d_in, d_out), minval=-bound, maxval=bound)

    params = {
        "gate": nn.init_linear(k_gate, d, e, bias=False),
        "experts": {"fc1": stacked(k1, d, hidden), "fc2": stacked(k2, d, hidden),
                    "fc3": stacked(k3, hidden, d)},
    }  # fmt: skip
    if cfg.num_shared_experts:
        params["shared"] = llama.init_feed_forward(k_shared, d, cfg.num_shared_experts * hidden)
    return params


def route(gate: dict, x: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits (N, E) of tokens x (N, D), each token's top-k experts (N, k), and their
    weights (N, k): a softmax over the k chosen logits."""
    logits = nn.linear(gate, x)  # (N, E)
    top_logits, experts = jax.lax.top_k(logits, top_k)  # (N, k)
    return logits, experts, jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1)


def dispatch(experts: dict, x: jax.Array, chosen: jax.Array, weights: jax.Array) -> jax.Array:
    """Each token x (N, D) through its chosen experts (N, k), the outputs summed with the
    `weights` (N, k): the N * k pairs sorted by expert, each expert's rows one group of
    `jax.lax.ragged_dot`. Returns (N, D)."""
    n, k = chosen.shape
    flat = chosen.reshape(-1)  # (N * k,)
    order = jnp.argsort(flat, stable=True)  # the pairs, expert by expert
    tokens = order // k  # the token of each sorted pair
    group_sizes = jnp.bincount(flat, length=experts["fc1"].shape[0]).astype(jnp.int32)  # (E,)
    xs = x[tokens]  # (N * k, D)
    hidden = jax.nn.silu(jax.lax.ragged_dot(xs, experts["fc1"], group_sizes))
    hidden = hidden * jax.lax.ragged_dot(xs, experts["fc2"], group_sizes)  # (N * k, hidden)
    ys = jax.lax.ragged_dot(hidden, experts["fc3"], group_sizes)  # (N * k, D)
    ys = ys * weights.reshape(-1)[order][:, None].astype(ys.dtype)
    return jnp.zeros_like(x).at[tokens].add(ys)


def load_balancing_loss(logits: jax.Array, chosen: jax.Array) -> jax.Array:
    """E * sum_e f_e P_e, f_e the share of token-expert pairs expert e got and P_e its mean router
    probability (Switch Transformer, eq. 4): 1 when the experts share the tokens evenly, up to E
    when one takes them all."""
    n_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # (N, E)
    share = jnp.bincount(chosen.reshape(-1), length=n_experts) / chosen.size  # (E,)
    return n_experts * jnp.sum(share * probs.mean(axis=0))


def feed_forward(params: dict, x: jax.Array, cfg: GPTConfig) -> jax.Array:
    """The mixture of experts: (B, T, D) -> (B, T, D)."""
    b, t, d = x.shape
    x2d = x.reshape(-1, d)  # (N, D)
    logits, chosen, weights = route(params["gate"], x2d, cfg.num_experts_per_tok)
    y = dispatch(params["experts"], x2d, chosen, weights)
    if cfg.router_aux_coef:
        y = nn.with_aux_loss(y, load_balancing_loss(logits, chosen), cfg.router_aux_coef)
    y = y.reshape(b, t, d)
    return y + llama.feed_forward(params["shared"], x) if "shared" in params else y
