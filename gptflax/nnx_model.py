"""The same GPT as Flax NNX modules: objects that own their parameters, like `torch.nn.Module`.

Written independently of `gptflax.gpt` (it shares only stateless math from `gptflax.nn`), so
that the tests showing the two compute the same thing mean something. Attribute names are the
book's, and match the keys of the functional params. Dropout randomness comes in at call time:
`model(tokens, rngs=nnx.Rngs(dropout=key))` trains, `model(tokens)` evaluates.

What the later chapters need, the NNX way: `model.init_cache(...)` gives the model a KV cache in
`nnx.Cache` variables, after which each call decodes the tokens after those it has seen;
`add_lora` swaps every linear layer for an `nnx.LoRALinear` (appendix E); and every parameter
carries the logical names of its axes (`nnx.with_partitioning`: "embed", "heads", "mlp",
"vocab"), which `nnx.logical_axis_rules` maps onto a mesh. The model never places itself.
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


def _uniform_init(n: int):
    """U(-1/sqrt(n), 1/sqrt(n)): PyTorch's Linear bias init for d_in = n, appendix E's A."""
    bound = 1.0 / math.sqrt(n)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def _named(init, *axes: str | None):
    """`init` whose parameter carries the logical names of its axes, and is placed nowhere."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


class _OnRows:
    """Run a linear layer on a 2-D view of x, (N, d_in), for the reason `gptflax.nn.linear`
    gives."""

    def __call__(self, x):
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Linear(_OnRows, nnx.Linear):
    """nnx.Linear on (N, d_in) rows."""


class LoRALinear(_OnRows, nnx.LoRALinear):
    """nnx.LoRALinear on (N, d_in) rows: x @ W + b + x @ A @ B (appendix E with alpha = rank)."""


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, axes: tuple, use_bias: bool = True) -> Linear:
    return Linear(
        d_in, d_out, use_bias=use_bias, kernel_init=_named(_torch_linear_init, *axes),
        bias_init=_named(_uniform_init(d_in), axes[1]), rngs=rngs,
    )  # fmt: skip


def _dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    return nnx.Dropout(rate)(x, deterministic=rngs is None or rate == 0.0, rngs=rngs)


class LayerNorm(nnx.Module):
    """Layer norm with the book's `scale` and `shift` (Book §4.2)."""

    def __init__(self, emb_dim: int):
        self.scale = nnx.Param(jnp.ones((emb_dim,)), out_sharding=("embed",), eager_sharding=False)
        self.shift = nnx.Param(jnp.zeros((emb_dim,)), out_sharding=("embed",), eager_sharding=False)

    def __call__(self, x):
        return nn.layer_norm({"scale": self.scale[...], "shift": self.shift[...]}, x)


class MultiHeadAttention(nnx.Module):
    """Causal multi-head self-attention (Book §3.6.2), over a KV cache once it holds one."""

    def __init__(
        self, d_in: int, d_out: int, n_heads: int, drop_rate: float, qkv_bias: bool, *, rngs
    ):
        self.n_heads, self.drop_rate = n_heads, drop_rate
        self.W_query = _linear(d_in, d_out, rngs, ("embed", "heads"), qkv_bias)
        self.W_key = _linear(d_in, d_out, rngs, ("embed", "heads"), qkv_bias)
        self.W_value = _linear(d_in, d_out, rngs, ("embed", "heads"), qkv_bias)
        self.out_proj = _linear(d_out, d_out, rngs, ("heads", "embed"))
        self.cached_key, self.cached_value = nnx.data(None), nnx.data(None)

    def init_cache(self, batch_size: int, length: int) -> None:
        """Empty keys and values for `length` positions, (B, H, L, Dh) each: slot s, position s."""
        head_dim = self.W_query.out_features // self.n_heads
        shape = (batch_size, self.n_heads, length, head_dim)
        self.cached_key, self.cached_value = (
            nnx.Cache(jnp.zeros(shape)),
            nnx.Cache(jnp.zeros(shape)),
        )

    def __call__(self, x, positions, *, rngs: nnx.Rngs | None = None):
        b, t, d = x.shape

        def heads(y):  # (B, T, D) -> (B, H, T, Dh)
            return y.reshape(b, t, self.n_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        k_positions = positions  # (T,)
        if self.cached_key is not None:  # decoding: earlier positions' keys and values too
            k, v = self._write_cache(k, v, positions[0])  # (B, H, L, Dh)
            k_positions = jnp.arange(k.shape[2])  # (L,)
        scores = q @ k.swapaxes(-1, -2) / q.shape[-1] ** 0.5  # (B, H, T, T or L)
        visible = k_positions[None, :] <= positions[:, None]  # causal, and no empty slot
        weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
        weights = _dropout(weights, self.drop_rate, rngs)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, d)  # (B, T, D)
        return self.out_proj(context)

    def _write_cache(self, k, v, start):
        """Store k, v (B, H, T, Dh) at positions start.. of the cache; the whole cache after."""
        at = (0, 0, start, 0)
        self.cached_key[...] = jax.lax.dynamic_update_slice(self.cached_key[...], k, at)
        self.cached_value[...] = jax.lax.dynamic_update_slice(self.cached_value[...], v, at)
        return self.cached_key[...], self.cached_value[...]


class FeedForward(nnx.Module):
    """D -> 4D -> GELU -> D (Book §4.3)."""

    def __init__(self, emb_dim: int, *, rngs):
        self.fc1 = _linear(emb_dim, 4 * emb_dim, rngs, ("embed", "mlp"))
        self.fc2 = _linear(4 * emb_dim, emb_dim, rngs, ("mlp", "embed"))

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

    def __call__(self, x, positions, *, rngs: nnx.Rngs | None = None):
        x = x + _dropout(self.att(self.norm1(x), positions, rngs=rngs), self.drop_rate, rngs)
        return x + _dropout(self.ff(self.norm2(x)), self.drop_rate, rngs)


class GPTModel(nnx.Module):
    """The GPT model: (B, T) token ids -> (B, T, vocab_size) logits (Book §4.6)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        embed_init = nnx.initializers.normal(1.0)  # torch.nn.Embedding's N(0, 1)
        self.tok_emb = nnx.Embed(
            cfg.vocab_size, cfg.emb_dim, embedding_init=_named(embed_init, "vocab", "embed"),
            rngs=rngs,
        )  # fmt: skip
        self.pos_emb = nnx.Embed(
            cfg.context_length, cfg.emb_dim, embedding_init=_named(embed_init, None, "embed"),
            rngs=rngs,
        )  # fmt: skip
        self.trf_blocks = nnx.List([TransformerBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = _linear(cfg.emb_dim, cfg.vocab_size, rngs, ("embed", "vocab"), False)
        self.cache_index = nnx.data(None)

    def init_cache(self, batch_size: int, length: int) -> None:
        """An empty KV cache of `length` positions in every block; from then on each call takes
        the tokens after those already seen, and only those."""
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))
        for blk in self.trf_blocks:
            blk.att.init_cache(batch_size, length)

    def __call__(self, tokens, *, rngs: nnx.Rngs | None = None):
        t = tokens.shape[-1]
        if t > self.cfg.context_length:
            raise ValueError(f"{t} tokens exceed the context length of {self.cfg.context_length}")
        start = 0 if self.cache_index is None else self.cache_index[...]
        positions = start + jnp.arange(t)  # (T,)
        x = self.tok_emb(tokens) + self.pos_emb(positions)  # (B, T, D)
        x = _dropout(x, self.cfg.drop_rate, rngs)
        for blk in self.trf_blocks:
            x = blk(x, positions, rngs=rngs)
        if self.cache_index is not None:
            self.cache_index[...] = start + t
        return self.out_head(self.final_norm(x))  # (B, T, V)


def add_lora(model: nnx.Module, rank: int, *, rngs: nnx.Rngs) -> None:
    """Model surgery for appendix E: every `Linear` becomes a `LoRALinear` around the same
    kernel and bias, A ~ U(-1/sqrt(rank), 1/sqrt(rank)) and B = 0 (`nnx.LoRAParam`s)."""
    for _, module in list(nnx.iter_modules(model)):
        for name, layer in list(vars(module).items()):
            if isinstance(layer, Linear):
                lora = LoRALinear(
                    layer.in_features, layer.out_features, lora_rank=rank,
                    use_bias=layer.use_bias, a_initializer=_uniform_init(rank), rngs=rngs,
                )  # fmt: skip
                lora.kernel, lora.bias = layer.kernel, layer.bias
                setattr(module, name, lora)


def stack_blocks(pure: dict) -> dict:
    """A pure dict of the model's state with its per-block entries ({0: ..., 1: ...} under
    "trf_blocks") stacked on a leading axis, as the functional params hold them."""
    blocks = [pure["trf_blocks"][i] for i in sorted(pure["trf_blocks"], key=int)]
    return {**pure, "trf_blocks": jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}


def to_params(model: GPTModel) -> dict:
    """The model's parameters as the functional params dict, blocks stacked on a leading axis."""
    return stack_blocks(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def lora_params(state: nnx.State) -> dict:
    """LoRA params, or their gradients (a State of `nnx.LoRAParam`s), in the functional layout
    of appendix E: {"A": (in, r), "B": (r, out)} per adapted layer, the blocks stacked."""

    def rename(tree: dict) -> dict:
        if "lora" in tree:
            return {"A": tree["lora"]["lora_a"], "B": tree["lora"]["lora_b"]}
        return {name: rename(sub) for name, sub in tree.items()}

    return stack_blocks(rename(nnx.to_pure_dict(state)))


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
