"""Low-rank adaptation (appendix E): train A (in, r) and B (r, out) beside each frozen linear
kernel W, so that the layer computes x @ W + (alpha / rank) * x @ A @ B: side by side while
training (`attach_lora`: the kernel becomes a `LoRAKernel`), merged into W for inference
(`merge_lora`).

The LoRA params mirror the model's: every `kernel` (all attention and feed-forward linears, and
the output head, as the appendix replaces every nn.Linear) gets {"A", "B"} of the same leading
(layer) axes. B starts at zero, so a fresh adaptation leaves the model's outputs unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def init_lora(key: jax.Array, params: dict, rank: int) -> dict:
    """A ~ U(-1/sqrt(rank), 1/sqrt(rank)) (torch's kaiming_uniform_(a=sqrt(5)) on an (in, rank)
    tensor, as appendix E draws it) and B = 0, for every linear kernel in `params`."""
    if "kernel" in params:
        *lead, d_in, d_out = params["kernel"].shape
        bound = 1.0 / math.sqrt(rank)
        a = jax.random.uniform(key, (*lead, d_in, rank), minval=-bound, maxval=bound)
        return {"A": a, "B": jnp.zeros((*lead, rank, d_out))}
    children = {name: sub for name, sub in params.items() if isinstance(sub, dict)}
    keys = jax.random.split(key, max(len(children), 1))
    lora = {
        name: init_lora(k, sub, rank)
        for k, (name, sub) in zip(keys, children.items(), strict=False)
    }
    return {name: sub for name, sub in lora.items() if sub}


def _with_lora(params: dict, lora: dict, combine) -> dict:
    """Params in which each adapted linear layer's dict is `combine(layer, A, B)`."""
    out = dict(params)
    for name, sub in lora.items():
        if "A" in sub:
            out[name] = combine(params[name], sub["A"], sub["B"])
        else:
            out[name] = _with_lora(params[name], sub, combine)
    return out


def merge_lora(params: dict, lora: dict, alpha: float, rank: int) -> dict:
    """Params whose kernels include the low-rank update: W + (alpha / rank) * A @ B. For
    inference: one matmul per layer again."""

    def merge(layer, a, b):
        return {**layer, "kernel": layer["kernel"] + (alpha / rank) * (a @ b)}  # (..., in, out)

    return _with_lora(params, lora, merge)


@jax.tree_util.register_pytree_node_class
class LoRAKernel:
    """A frozen kernel W (in, out) with its low-rank update beside it: `x @ kernel` computes
    x @ W + (x @ A) @ B, the appendix's LinearWithLoRA (alpha / rank is already in A)."""

    def __init__(self, w: jax.Array, a: jax.Array, b: jax.Array):
        self.w, self.a, self.b = w, a, b

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    def __rmatmul__(self, x2d: jax.Array) -> jax.Array:
        return x2d @ self.w + (x2d @ self.a) @ self.b  # (N, out) + (N, r) @ (r, out)

    def tree_flatten(self):
        return (self.w, self.a, self.b), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def attach_lora(params: dict, lora: dict, alpha: float, rank: int) -> dict:
    """Params whose adapted kernels are `LoRAKernel`s of W, (alpha / rank) * A and B, so that
    `nn.linear` computes x @ W + (x @ A) @ B: for training. No (in, out) update is formed, and
    with W frozen autodiff forms no (in, out) weight gradient either."""

    def attach(layer, a, b):
        return {**layer, "kernel": LoRAKernel(layer["kernel"], (alpha / rank) * a, b)}

    return _with_lora(params, lora, attach)


def lora_loss(loss, alpha: float, rank: int):
    """Turn `loss(params, *batch, key=)` into a loss over {"base": params, "lora": lora} that
    differentiates only the LoRA params, computed in the side-by-side form (`attach_lora`)."""

    def wrapped(both: dict, *batch, key=None):
        base = jax.lax.stop_gradient(both["base"])
        return loss(attach_lora(base, both["lora"], alpha, rank), *batch, key=key)

    return wrapped


def lora_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` for the "lora" params; the "base" params never change and keep no optimizer state."""

    def labels(both):
        return {
            "base": jax.tree.map(lambda _: "frozen", both["base"]),
            "lora": jax.tree.map(lambda _: "train", both["lora"]),
        }

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
