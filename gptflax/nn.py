"""Stateless building blocks over plain dicts of arrays: embeddings, linear, layer norm, GELU.

Initialisers follow PyTorch's defaults, as the book's models use them: N(0, 1) embeddings and
U(-1/sqrt(d_in), 1/sqrt(d_in)) linear weights and biases. Kernels are (d_in, d_out): y = x @ W + b.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp


def init_embedding(key: jax.Array, num: int, dim: int) -> dict:
    """An embedding table {"embedding": (num, dim)} drawn from N(0, 1)."""
    return {"embedding": jax.random.normal(key, (num, dim))}


def embedding(params: dict, ids: jax.Array) -> jax.Array:
    """Look up rows of the table: ids (...,) -> (..., dim) (Book §2.7)."""
    return jnp.take(params["embedding"], ids, axis=0)


def init_linear(key: jax.Array, d_in: int, d_out: int, bias: bool = True) -> dict:
    """{"kernel": (d_in, d_out), "bias": (d_out,)} drawn from U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    k_w, k_b = jax.random.split(key)
    bound = 1.0 / math.sqrt(d_in)
    params = {"kernel": jax.random.uniform(k_w, (d_in, d_out), minval=-bound, maxval=bound)}
    if bias:
        params["bias"] = jax.random.uniform(k_b, (d_out,), minval=-bound, maxval=bound)
    return params


def linear(params: dict, x: jax.Array) -> jax.Array:
    """x (..., d_in) @ kernel (d_in, d_out) + bias -> (..., d_out); the bias when there is one.

    The leading axes are flattened first, so the matmul is 2-D, (N, d_in) @ (d_in, d_out), and so
    is the weight gradient autodiff derives from it: XLA's CPU backend runs that form at full speed
    (the README's speed section has the numbers). The kernel is anything `x @` multiplies: an
    array, or a kernel type of LoRA's (`gptflax.lora`) or of the decoding layout's
    (`gptflax.decoding`).
    """
    x2d = x.reshape(-1, x.shape[-1])  # (N, d_in)
    y = x2d @ params["kernel"]  # (N, d_out)
    y = y.reshape(*x.shape[:-1], y.shape[-1])  # (..., d_out)
    return y + params["bias"] if "bias" in params else y


def init_layer_norm(dim: int) -> dict:
    """Layer-norm params: scale ones, shift zeros (Book §4.2)."""
    return {"scale": jnp.ones((dim,)), "shift": jnp.zeros((dim,))}


def layer_norm(params: dict, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Normalise the last axis with the biased variance, then scale and shift (Book §4.2).

    The statistics are computed in float32 and the result has x's dtype (bf16 stays bf16)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = x32.var(axis=-1, keepdims=True)  # biased, like torch's unbiased=False
    normed = ((x32 - mean) / jnp.sqrt(var + eps)).astype(x.dtype)
    return params["scale"] * normed + params["shift"]


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """GELU, the tanh approximation GPT-2 used (Book §4.3)."""
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + 0.044715 * x**3)))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    """GELU's derivative written out, so a training step keeps one (..., 4D) array per block for
    the backward pass instead of the six intermediates of the formula."""
    (x,), (x_dot,) = primals, tangents
    t = jnp.tanh(_GELU_C * (x + 0.044715 * x**3))
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return 0.5 * x * (1.0 + t), slope * x_dot


def split_key(key: jax.Array | None, n: int) -> list:
    """n independent keys from `key`, or n Nones when there is none (evaluation: no dropout)."""
    return list(jax.random.split(key, n)) if key is not None else [None] * n


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Zero elements with probability `rate`, scale the rest by 1/(1-rate); key None: identity.

    Drawing random numbers is the slow part of dropout on a CPU, so each 32-bit random word decides
    two elements, 16 bits each: `rate` is rounded to a multiple of 1/65536 (0.1 -> 0.1000061) and
    the survivors are scaled by 1/(1 - that rate), which keeps the mean exact.
    """
    if key is None or rate == 0.0:
        return x
    if not 0.0 < rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    threshold = round(rate * 2**16)
    words = jax.random.bits(key, (-(-x.size // 2),), jnp.uint32)  # ceil(size / 2)
    halves = jnp.concatenate([words & 0xFFFF, words >> 16])[: x.size].reshape(x.shape)
    return jnp.where(halves >= threshold, x * (2**16 / (2**16 - threshold)), 0.0)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def with_aux_loss(x: jax.Array, aux: jax.Array, coef: float) -> jax.Array:
    """x unchanged; in the backward pass `aux` receives the gradient `coef`, as if coef * aux
    were added to the loss."""
    return x


def _with_aux_loss_fwd(x, aux, coef):
    return x, None


def _with_aux_loss_bwd(coef, _, g):
    return g, jnp.asarray(coef, jnp.float32)


with_aux_loss.defvjp(_with_aux_loss_fwd, _with_aux_loss_bwd)


# --- stacked transformer blocks: every family keeps its blocks' params under "trf_blocks" ---------


def count_params(params) -> int:
    """Number of scalars in a params pytree (works on `jax.eval_shape` output too)."""
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def block_params(params: dict, i: int) -> dict:
    """The params of block i, un-stacked from `trf_blocks`."""
    return jax.tree.map(lambda leaf: leaf[i], params["trf_blocks"])
