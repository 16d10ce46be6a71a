"""The decoding layout: the params as a KV-cached decoding loop reads them fastest.

Three changes, made once before a decoding loop starts (or once per model, `decoding_params`):
- the blocks unstacked into a list, so that no decoded token slices its layers out of the stack;
- the query, key and value projections of each attention joined into one `JoinedLinear`,
  `W_qkv`: one matmul that streams all three weights (at one row, SmolLM2's (576, 192) key and
  value projections ran at 16.5 GB/s each, the joined (576, 960) at 32); likewise a gated feed
  forward's gate and value projections, fc1 and fc2, into `W_gate_value`;
- on a CPU, every kernel stored transposed, (d_out, d_in) as PyTorch keeps it, in a
  `TransposedKernel`: a decoding step multiplies only a few rows, and XLA's CPU dot streams a
  weight past them fastest with the weight on the left, (W^T @ x^T)^T. Measured on this 2-core
  CPU with the weights out of cache, a (768, 3072) weight at 8 rows: 16-18 GB/s as x @ W, 22-24
  GB/s this way; from 256 rows on it loses, so the form is kept for up to 64 rows.
A tied output head reads the token embedding (V, D) as such a kernel, with no transpose at all.

The result is a `DecodingParams`, a type of its own: the training and evaluation functions refuse
it by name (`check_trainable`), and the decoders accept either kind.
"""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptflax import nn
from gptflax.attention import QKV

ROWS_ON_THE_RIGHT = 64  # up to this many rows, the weight goes on the left of the CPU dot


@jax.tree_util.register_pytree_node_class
class TransposedKernel:
    """A linear layer's weight kept (d_out, d_in); `x @ kernel` computes x @ w_t.T, (N, d_out)."""

    def __init__(self, w_t: jax.Array):
        self.w_t = w_t

    @property
    def shape(self) -> tuple[int, int]:
        return self.w_t.shape[::-1]  # the (d_in, d_out) it stands for

    def __rmatmul__(self, x2d: jax.Array) -> jax.Array:
        """(N, d_in) @ this -> (N, d_out). For up to 64 rows on a CPU the product is taken as
        (w_t @ x2d.T).T with the small transpose kept out of the dot: XLA would fold it back into
        a dot that streams the weights up to 1.6x slower. A bf16 weight is read instead by a fused
        multiply-and-sum, never stored: XLA's CPU dot widens every bf16 weight of a step into fp32
        copies that are all alive at once (5.8 GiB for Qwen2.5-Coder-1.5B), and the sum is also
        faster at a few rows ((8960, 1536) at 1 row: 3.2 against 25 ms; 3x slower at 32)."""
        rows, on_cpu = x2d.shape[0], jax.default_backend() == "cpu"
        if on_cpu and self.w_t.dtype == jnp.bfloat16 and rows <= ROWS_ON_THE_RIGHT:
            products = self.w_t.astype(jnp.float32) * x2d.astype(jnp.float32)[:, None, :]
            return products.sum(-1).astype(x2d.dtype)  # (N, d_out, d_in) fused, never stored
        if on_cpu and rows <= ROWS_ON_THE_RIGHT:
            return jax.lax.optimization_barrier(self.w_t @ x2d.T).T  # (d_out, N) -> (N, d_out)
        return x2d @ self.w_t.T

    def tree_flatten(self):
        return (self.w_t,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@jax.tree_util.register_pytree_node_class
class JoinedLinear:
    """Linear layers that read the same input, joined side by side: `params` is one linear
    layer {"kernel": (d_in, sum of d_outs), "bias"?}, `sizes` the layers' d_outs. Called on x
    (..., d_in), it returns each layer's output (..., d_out), as they would."""

    def __init__(self, params: dict, sizes: tuple[int, ...]):
        self.params, self.sizes = params, sizes

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        joined = nn.linear(self.params, x)  # (..., sum of d_outs)
        return tuple(jnp.split(joined, list(accumulate(self.sizes[:-1])), axis=-1))

    def tree_flatten(self):
        return (self.params,), self.sizes

    @classmethod
    def tree_unflatten(cls, sizes, children):
        return cls(children[0], sizes)


class DecodingParams(NamedTuple):
    """Params in the decoding layout; `params["trf_blocks"]` is a list of per-layer params."""

    params: dict


def unstack_blocks(params: dict) -> dict:
    """The params with `trf_blocks` as a list of per-layer params instead of stacked arrays."""
    if isinstance(params["trf_blocks"], list):
        return params
    n_layers = jax.tree.leaves(params["trf_blocks"])[0].shape[0]
    blocks = [
        jax.tree.map(lambda leaf, i=i: leaf[i], params["trf_blocks"]) for i in range(n_layers)
    ]
    return {**params, "trf_blocks": blocks}


def decoding_layout(params: dict | DecodingParams) -> DecodingParams:
    """The params laid out for decoding (see the module's docstring); laid-out ones as they are."""
    if isinstance(params, DecodingParams):
        return params
    laid_out = _joined(unstack_blocks(params))
    if jax.default_backend() == "cpu":
        laid_out = _kernels_transposed(laid_out)
        if "out_head" not in laid_out:  # tied: the embedding (V, D) is the head's kernel_t
            laid_out["out_head"] = {"kernel": TransposedKernel(params["tok_emb"]["embedding"])}
    return DecodingParams(laid_out)


def decoding_params(params: dict | DecodingParams) -> DecodingParams:
    """`decoding_layout`, jitted: lay a model out once for the many calls of a session (the
    decoders skip the per-call copy of every weight). The params it was made from are untouched;
    laid-out ones are returned as they are, not copied again."""
    return params if isinstance(params, DecodingParams) else _laid_out(params)


_laid_out = jax.jit(decoding_layout)


def params_dict(params: dict | DecodingParams) -> dict:
    """The params' dict, laid out for decoding or not."""
    return params.params if isinstance(params, DecodingParams) else params


def check_trainable(params) -> None:
    """A clear error for params in the decoding layout where a function needs the model's own."""
    if isinstance(params, DecodingParams):
        raise TypeError(
            "these params are in the decoding layout (decoding_params), which only the KV-cached "
            "decoders read: pass the model's own params"
        )


# Linear layers that read the same input, joined in the decoding layout: the joined name, the
# layers' names, and a name the params must also hold (a gated unit's fc3: GPT's fc1 and fc2 run
# one after the other).
JOINS = (("W_qkv", QKV, None), ("W_gate_value", ("fc1", "fc2"), "fc3"))


def _joined(node):
    """A params tree with each group of JOINS joined into one JoinedLinear, where the group's
    layers are all plain linear layers (no LoRA) with biases in all or none."""
    if isinstance(node, list):
        return [_joined(child) for child in node]
    if not isinstance(node, dict):
        return node
    node = {name: _joined(child) for name, child in node.items()}
    for joined_name, names, also in JOINS:
        layers = [node.get(name) for name in names]
        plain = (also is None or also in node) and all(
            isinstance(layer, dict) and set(layer) <= {"kernel", "bias"}
            and isinstance(layer["kernel"], jax.Array | np.ndarray)
            for layer in layers
        )  # fmt: skip
        if not plain or len({"bias" in layer for layer in layers}) > 1:
            continue
        joined = {part: jnp.concatenate([layer[part] for layer in layers], -1)
                  for part in layers[0]}  # fmt: skip
        sizes = tuple(layer["kernel"].shape[1] for layer in layers)
        node = {name: child for name, child in node.items() if name not in names}
        node[joined_name] = JoinedLinear(joined, sizes)
    return node


def _kernels_transposed(node):
    """A params tree with every `kernel` (d_in, d_out) kept as a TransposedKernel (d_out, d_in)."""
    if isinstance(node, list):
        return [_kernels_transposed(child) for child in node]
    if isinstance(node, JoinedLinear):
        return JoinedLinear(_kernels_transposed(node.params), node.sizes)
    if not isinstance(node, dict):
        return node
    return {
        name: TransposedKernel(jnp.asarray(child).T)
        if name == "kernel" and not isinstance(child, TransposedKernel)
        else _kernels_transposed(child)
        for name, child in node.items()
    }
