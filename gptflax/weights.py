"""Weights from elsewhere into gptflax params.

`from_book_state_dict` takes the `state_dict()` of the book's PyTorch `GPTModel` (as numpy
arrays, or anything `numpy.asarray` takes), so a model trained with the book's code can be
continued, compared or served here. PyTorch's Linear stores (out, in) weights; gptflax kernels are
(in, out), hence the transposes.
"""

from __future__ import annotations

import jax
import numpy as np

from gptflax.config import GPTConfig

# gptflax names -> the book's module names, inside one transformer block.
BOOK_BLOCK_LINEARS = {
    ("att", "W_query"): "att.W_query",
    ("att", "W_key"): "att.W_key",
    ("att", "W_value"): "att.W_value",
    ("att", "out_proj"): "att.out_proj",
    ("ff", "fc1"): "ff.layers.0",
    ("ff", "fc2"): "ff.layers.2",
}


def _getter(state_dict, cfg: GPTConfig):
    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in state_dict:
            raise KeyError(f"state_dict has no {key!r}: is it a book GPTModel for {cfg}?")
        value = np.asarray(state_dict[key], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{key}: shape {value.shape}, expected {shape} for {cfg}")
        return value

    return get


def from_book_state_dict(state_dict, cfg: GPTConfig) -> dict:
    """gptflax params from the book's PyTorch GPTModel state_dict (Book §4.6 names)."""
    get = _getter(state_dict, cfg)
    d, v = cfg.emb_dim, cfg.vocab_size

    def linear(prefix: str, d_in: int, d_out: int, bias: bool = True) -> dict:
        params = {"kernel": get(f"{prefix}.weight", (d_out, d_in)).T}
        if bias:
            params["bias"] = get(f"{prefix}.bias", (d_out,))
        return params

    def norm(prefix: str) -> dict:
        return {"scale": get(f"{prefix}.scale", (d,)), "shift": get(f"{prefix}.shift", (d,))}

    def block(i: int) -> dict:
        p = f"trf_blocks.{i}"
        params: dict = {
            "att": {},
            "ff": {},
            "norm1": norm(f"{p}.norm1"),
            "norm2": norm(f"{p}.norm2"),
        }
        for (group, name), book_name in BOOK_BLOCK_LINEARS.items():
            d_in, d_out = {"fc1": (d, 4 * d), "fc2": (4 * d, d)}.get(name, (d, d))
            bias = cfg.qkv_bias or name not in ("W_query", "W_key", "W_value")
            params[group][name] = linear(f"{p}.{book_name}", d_in, d_out, bias)
        return params

    blocks = [block(i) for i in range(cfg.n_layers)]
    return {
        "tok_emb": {"embedding": get("tok_emb.weight", (v, d))},
        "pos_emb": {"embedding": get("pos_emb.weight", (cfg.context_length, d))},
        "trf_blocks": jax.tree.map(lambda *leaves: np.stack(leaves), *blocks),
        "final_norm": norm("final_norm"),
        "out_head": linear("out_head", d, v, bias=False),
    }
