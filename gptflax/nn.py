"""Stateless building blocks over plain dicts of arrays: embeddings, linear, layer norm, GELU.

Initialisers follow PyTorch's defaults, as the book's models use them: N(0, 1) embeddings and
U(-1/sqrt(d_in), 1/sqrt(d_in)) linear weights and biases. Kernels are (d_in, d_out): y = x @ W + b.
"""

from __future__ import annotations

import math

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
    """x (..., d_in) -> (..., d_out) with the params' `kernel` (d_in, d_out), or their `kernel_t`
    (d_out, d_in) in the decoding layout (`decoding_layout`); adds the bias when the params have
    one, and a LoRA update x @ lora_A @ lora_B when they carry one.

    The leading axes are flattened first, so the matmul is 2-D, (N, d_in) @ (d_in, d_out), and so
    is the weight gradient autodiff derives from it: XLA's CPU backend runs that form at full speed
    (the README's speed section has the numbers).
    """
    x2d = x.reshape(-1, x.shape[-1])  # (N, d_in)
    if "kernel_t" in params:
        y = times_transposed(x2d, params["kernel_t"])
    else:
        y = x2d @ params["kernel"]  # (N, d_out)
    if "lora_A" in params:  # appendix E's low-rank path beside the frozen kernel (gptflax.lora)
        y = y + (x2d @ params["lora_A"]) @ params["lora_B"]  # (N, r) @ (r, d_out)
    y = y.reshape(*x.shape[:-1], y.shape[-1])  # (..., d_out)
    return y + params["bias"] if "bias" in params else y


def times_transposed(x2d: jax.Array, w_t: jax.Array) -> jax.Array:
    """x2d (N, d_in) @ w_t.T for a weight stored (d_out, d_in) -> (N, d_out).

    For up to 64 rows on a CPU (a decoding step) the product is taken as (w_t @ x2d.T).T, the
    weights on the left in their stored layout, with the transpose of the small result kept out
    of the dot: XLA would fold it back in, into a dot that streams the weights up to 1.6x slower
    (README, decoding)."""
    if jax.default_backend() == "cpu" and x2d.shape[0] <= 64:
        return jax.lax.optimization_barrier(w_t @ x2d.T).T  # (d_out, N) -> (N, d_out)
    return x2d @ w_t.T


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


# --- stacked transformer blocks: every family keeps its blocks' params under "trf_blocks" ---------


def scan_layers(step, x: jax.Array, layers):
    """`lax.scan` of `step(x, layer) -> (x, None)` over stacked per-layer values: the blocks run
    in order, carrying x. Off the CPU the loop is unrolled: there, slicing each layer's weights out
    of the stack and stacking what the backward pass keeps were copies that cost more than the
    attention (see README); on a CPU, unrolling only lengthens the compile."""
    return jax.lax.scan(step, x, layers, unroll=jax.default_backend() != "cpu")[0]


def count_params(params) -> int:
    """Number of scalars in a params pytree (works on `jax.eval_shape` output too)."""
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def block_params(params: dict, i: int) -> dict:
    """The params of block i, un-stacked from `trf_blocks`."""
    return jax.tree.map(lambda leaf: leaf[i], params["trf_blocks"])


def unstack_blocks(params: dict) -> dict:
    """The params with `trf_blocks` as a list of per-layer params instead of stacked arrays
    (params whose blocks are a list already come back as they are)."""
    if isinstance(params["trf_blocks"], list):
        return params
    n_layers = jax.tree.leaves(params["trf_blocks"])[0].shape[0]
    return {**params, "trf_blocks": [block_params(params, i) for i in range(n_layers)]}


def decoding_layout(params: dict) -> dict:
    """The params as a decoding loop reads them best: the blocks as a list (`unstack_blocks`), so
    that no token slices a layer out of the stack, and on a CPU every linear's kernel transposed
    to `kernel_t` (d_out, d_in), PyTorch's layout, the one `times_transposed` streams fastest.
    Params whose blocks are a list already come back as they are."""
    if isinstance(params["trf_blocks"], list):
        return params
    unstacked = unstack_blocks(params)
    return _kernels_transposed(unstacked) if jax.default_backend() == "cpu" else unstacked


def _kernels_transposed(node):
    """A params tree with every `kernel` (d_in, d_out) replaced by `kernel_t` (d_out, d_in)."""
    if isinstance(node, list):
        return [_kernels_transposed(child) for child in node]
    if not isinstance(node, dict):
        return node
    return {
        ("kernel_t" if name == "kernel" else name): (
            child.T if name == "kernel" else _kernels_transposed(child)
        )
        for name, child in node.items()
    }
