"""The same GPT as Flax NNX modules: objects that own their parameters, like `torch.nn.Module`.

Written independently of `gptflax.gpt` (it shares only stateless math from `gptflax.nn`), so
that the tests showing the two compute the same thing mean something. Attribute names are the
book's, and match the keys of the functional params. Dropout randomness comes in at call time:
`model(tokens, rngs=nnx.Rngs(dropout=key))` trains, `model(tokens)` evaluates.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptflax import nn
from gptflax.config import GPTConfig

# PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as the book's models use.
_torch_linear_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_bias_init(d_in: int):
    """PyTorch's default Linear bias init, U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(d_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class Linear(nnx.Linear):
    """nnx.Linear on a 2-D view of x, (N, d_in), for the reason `gptflax.nn.linear` gives."""

    def __call__(self, x):
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> Linear:
    return Linear(
        d_in, d_out, use_bias=use_bias, kernel_init=_torch_linear_init,
        bias_init=_torch_bias_init(d_in), rngs=rngs,
    )  # fmt: skip


def _dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    return nnx.Dropout(rate)(x, deterministic=rngs is None or rate == 0.0, rngs=rngs)


class LayerNorm(nnx.Module):
    """Layer norm with the book's `scale` and `shift` (Book §4.2)."""

    def __init__(self, emb_dim: int):
        self.scale = nnx.Param(jnp.ones((emb_dim,)))
        self.shift = nnx.Param(jnp.zeros((emb_dim,)))

    def __call__(self, x):
        return nn.layer_norm({"scale": self.scale[...], "shift": self.shift[...]}, x)


class MultiHeadAttention(nnx.Module):
    """Causal multi-head self-attention (Book §3.6.2)."""

    def __init__(
        self, d_in: int, d_out: int, n_heads: int, drop_rate: float, qkv_bias: bool, *, rngs
    ):
        self.n_heads, self.drop_rate = n_heads, drop_rate
        self.W_query = _linear(d_in, d_out, rngs, qkv_bias)
        self.W_key = _linear(d_in, d_out, rngs, qkv_bias)
        self.W_value = _linear(d_in, d_out, rngs, qkv_bias)
        self.out_proj = _linear(d_out, d_out, rngs)

    def __call__(self, x, *, rngs: nnx.Rngs | None = None):
        b, t, d = x.shape
        head_dim = d // self.n_heads

        def heads(y):  # (B, T, D) -> (B, T, H, Dh)
            return y.reshape(b, t, self.n_heads, head_dim)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5  # (B, H, T, T)
        future = jnp.triu(jnp.ones((t, t), dtype=bool), k=1)
        weights = jax.nn.softmax(jnp.where(future, -jnp.inf, scores), axis=-1)
        weights = _dropout(weights, self.drop_rate, rngs)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)  # (B, T, D)
        return self.out_proj(context)


class FeedForward(nnx.Module):
    """D -> 4D -> GELU -> D (Book §4.3)."""

    def __init__(self, emb_dim: int, *, rngs):
        self.fc1 = _linear(emb_dim, 4 * emb_dim, rngs)
        self.fc2 = _linear(4 * emb_dim, emb_dim, rngs)

    def __call__(self, x):
        return self.fc2(nn.gelu(self.fc1(x)))


class TransformerBlock(nnx.Module):
    """Pre-norm block with shortcut connections (Book §4.5)."""

    def __init__(self, cfg: GPTConfig, *, rngs):
        self.drop_rate = cfg.drop_rate
        self.att = MultiHeadAttention(
            cfg.emb_dim, cfg.emb_dim, cfg.n_heads, cfg.drop_rate, cfg.qkv_bias, rngs=rngs
        )
        self.ff = FeedForward(cfg.emb_dim, rngs=rngs)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)

    def __call__(self, x, *, rngs: nnx.Rngs | None = None):
        x = x + _dropout(self.att(self.norm1(x), rngs=rngs), self.drop_rate, rngs)
        return x + _dropout(self.ff(self.norm2(x)), self.drop_rate, rngs)


class GPTModel(nnx.Module):
    """The GPT model: (B, T) token ids -> (B, T, vocab_size) logits (Book §4.6)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        embed_init = nnx.initializers.normal(1.0)  # torch.nn.Embedding's N(0, 1)
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=embed_init, rngs=rngs)
        self.pos_emb = nnx.Embed(
            cfg.context_length, cfg.emb_dim, embedding_init=embed_init, rngs=rngs
        )
        self.trf_blocks = nnx.List([TransformerBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = _linear(cfg.emb_dim, cfg.vocab_size, rngs, use_bias=False)

    def __call__(self, tokens, *, rngs: nnx.Rngs | None = None):
        t = tokens.shape[-1]
        if t > self.cfg.context_length:
            raise ValueError(f"{t} tokens exceed the context length of {self.cfg.context_length}")
        x = self.tok_emb(tokens) + self.pos_emb(jnp.arange(t))  # (B, T, D)
        x = _dropout(x, self.cfg.drop_rate, rngs)
        for blk in self.trf_blocks:
            x = blk(x, rngs=rngs)
        return self.out_head(self.final_norm(x))  # (B, T, V)


def to_params(model: GPTModel) -> dict:
    """The model's parameters as the functional params dict, blocks stacked on a leading axis."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    blocks = [pure["trf_blocks"][i] for i in range(len(model.trf_blocks))]
    return {**pure, "trf_blocks": jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}


def from_params(cfg: GPTConfig, params: dict) -> GPTModel:
    """A GPTModel holding the given functional params; allocates nothing but those arrays."""
    model = nnx.eval_shape(lambda: GPTModel(cfg, rngs=nnx.Rngs(0)))
    blocks = params["trf_blocks"]
    pure = {
        **params,
        "trf_blocks": {
            i: jax.tree.map(lambda leaf, i=i: leaf[i], blocks) for i in range(cfg.n_layers)
        },
    }
    state = nnx.state(model, nnx.Param)
    _check_fits(nnx.to_pure_dict(state), pure, cfg)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def _check_fits(expected: dict, given: dict, cfg: GPTConfig) -> None:
    want, have = (jax.tree.map(jnp.shape, t) for t in (expected, given))
    if want != have:
        raise ValueError(f"params do not fit {cfg}: expected shapes {want}, got {have}")
