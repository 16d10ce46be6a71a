"""The GPT family's weights: OpenAI's GPT-2 and the book's own PyTorch `GPTModel`.

`load_gpt2(size)` loads OpenAI's GPT-2 weights (Book §5.5) from Hugging Face's safetensors files,
resolved through `gptflax.files` (cache, mirrors, then https://huggingface.co); no TensorFlow
needed. GPT-2 stores its linear layers as Conv1D, (in, out) like gptflax kernels, with the query,
key and value projections side by side in one `c_attn` matrix, and ties the output head to the
token embedding.

`from_book_state_dict` takes the `state_dict()` of the book's PyTorch `GPTModel` (as numpy
arrays, or anything `numpy.asarray` takes), so a model trained with the book's code can be
continued, compared or served here. PyTorch's Linear stores (out, in) weights; gptflax kernels are
(in, out), hence the transposes.
"""

from __future__ import annotations

import jax
import numpy as np

from gptflax import files
from gptflax.attention import QKV
from gptflax.config import GPT2_PRESETS, GPTConfig
from gptflax.weights import tensor_getter

# gptflax names -> the book's module names, inside one transformer block.
BOOK_BLOCK_LINEARS = {
    ("att", "W_query"): "att.W_query",
    ("att", "W_key"): "att.W_key",
    ("att", "W_value"): "att.W_value",
    ("att", "out_proj"): "att.out_proj",
    ("ff", "fc1"): "ff.layers.0",
    ("ff", "fc2"): "ff.layers.2",
}


def from_book_state_dict(state_dict, cfg: GPTConfig) -> dict:
    """gptflax params from the book's PyTorch GPTModel state_dict (Book §4.6 names)."""
    get = tensor_getter(state_dict, "state_dict", f"a book GPTModel for {cfg}")
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
            bias = cfg.qkv_bias or name not in QKV
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


def from_hf_gpt2(tensors, cfg: GPTConfig) -> dict:
    """gptflax params from the tensors of a Hugging Face GPT-2 file (`wte.weight`, `h.0...`)."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    get = tensor_getter(tensors, "the GPT-2 file", f"GPT-2 for {cfg}")
    d = cfg.emb_dim

    def norm(prefix: str) -> dict:
        return {"scale": get(f"{prefix}.weight", (d,)), "shift": get(f"{prefix}.bias", (d,))}

    def conv1d(prefix: str, d_in: int, d_out: int) -> dict:
        return {
            "kernel": get(f"{prefix}.weight", (d_in, d_out)),
            "bias": get(f"{prefix}.bias", (d_out,)),
        }

    def block(i: int) -> dict:
        h = f"h.{i}"
        qkv = conv1d(f"{h}.attn.c_attn", d, 3 * d)
        q, k, v = (
            {"kernel": w, "bias": b}
            for w, b in zip(
                np.split(qkv["kernel"], 3, axis=1), np.split(qkv["bias"], 3), strict=True
            )
        )
        return {
            "att": {
                "W_query": q,
                "W_key": k,
                "W_value": v,
                "out_proj": conv1d(f"{h}.attn.c_proj", d, d),
            },
            "ff": {
                "fc1": conv1d(f"{h}.mlp.c_fc", d, 4 * d),
                "fc2": conv1d(f"{h}.mlp.c_proj", 4 * d, d),
            },
            "norm1": norm(f"{h}.ln_1"),
            "norm2": norm(f"{h}.ln_2"),
        }

    if not cfg.qkv_bias:
        raise ValueError("GPT-2 has query/key/value biases: use cfg.replace(qkv_bias=True)")
    wte = get("wte.weight", (cfg.vocab_size, d))
    blocks = [block(i) for i in range(cfg.n_layers)]
    return {
        "tok_emb": {"embedding": wte},
        "pos_emb": {"embedding": get("wpe.weight", (cfg.context_length, d))},
        "trf_blocks": jax.tree.map(lambda *leaves: np.stack(leaves), *blocks),
        "final_norm": norm("ln_f"),
        "out_head": {"kernel": np.ascontiguousarray(wte.T)},  # tied to the token embedding
    }


def gpt2_config(size: str) -> GPTConfig:
    """The config OpenAI's GPT-2 weights of `size` need: context 1024 and qkv_bias=True (§5.5)."""
    if size not in GPT2_PRESETS:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(GPT2_PRESETS)}")
    return GPT2_PRESETS[size].replace(qkv_bias=True, context_length=1024)


def load_gpt2_file(path, cfg: GPTConfig) -> dict:
    """Params from a GPT-2 safetensors file, with a clear error for a damaged one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); delete it and fetch it again"
        ) from e
    return from_hf_gpt2(tensors, cfg)


def load_gpt2(size: str = "124M", **resolve_options) -> tuple[GPTConfig, dict]:
    """(config, params) of OpenAI's GPT-2 `size` ("124M", "355M", "774M" or "1558M") (Book §5.5).

    The file is resolved by `gptflax.files.resolve` (cache, mirrors, download); its error says
    where to put the file by hand. `resolve_options` go to it (cache_dir, mirrors, download).
    """
    cfg = gpt2_config(size)
    path = files.resolve(f"gpt2/{size}/model.safetensors", **resolve_options)
    return cfg, load_gpt2_file(path, cfg)
