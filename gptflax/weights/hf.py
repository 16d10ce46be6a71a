"""Llama-like models (Llama, SmolLM2, Qwen2, Qwen3) from Hugging Face model folders (config.json
and safetensors files, sharded or not, bf16 read as it is), and from the state_dict of the book's
PyTorch `Llama3Model` (bonus chapter: GPT to Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gptflax.config import Llama3RoPE, LlamaConfig, QwenConfig
from gptflax.weights import tensor_getter
from gptflax.weights.names import BOOK, HF, LLAMA_BLOCK, QK_NORM, params_from_tensors


def config_from_hf(config: dict):
    """The config of a Hugging Face `config.json`: a Llama (Llama 2 and 3, SmolLM2), Qwen2 or
    Qwen3 model."""
    kind = config.get("model_type", "llama")
    if kind not in BLOCK_NAMES:
        raise ValueError(f"gptflax reads {', '.join(BLOCK_NAMES)} models, not {kind!r}")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    n_heads = config["num_attention_heads"]
    shared = dict(
        vocab_size=config["vocab_size"],
        context_length=config["max_position_embeddings"],
        emb_dim=config["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads", n_heads),
        hidden_dim=config["intermediate_size"],
        n_layers=config["num_hidden_layers"],
        rope_base=float(config.get("rope_theta", rope.get("rope_theta", 10_000.0))),
        rms_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=config.get("head_dim"),
    )
    if kind != "llama":
        return QwenConfig(**shared, qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3")
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = Llama3RoPE(
            factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_context_length=rope["original_max_position_embeddings"],
        )  # fmt: skip
    return LlamaConfig(**shared, rope_scaling=scaling)


BLOCK_NAMES = {"llama": LLAMA_BLOCK, "qwen2": LLAMA_BLOCK, "qwen3": {**LLAMA_BLOCK, **QK_NORM}}


def read_hf_folder(folder) -> tuple[dict, dict]:
    """(config.json, tensors) of a Hugging Face model folder: `model.safetensors`, or the shards
    listed in `model.safetensors.index.json`; bf16 files are read as they are."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        index = folder / "model.safetensors.index.json"
        shards = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        tensors = {}
        for shard in shards:
            tensors |= load_file(str(folder / shard))
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ValueError(
            f"{folder} is not a readable Hugging Face model folder (config.json and safetensors "
            f"files): {e}"
        ) from e
    return config, tensors


def load_hf(folder, dtype=np.float32) -> tuple:
    """(config, params) of a Hugging Face model folder (Llama 2 and 3, SmolLM2, Qwen2, Qwen3)."""
    config, tensors = read_hf_folder(folder)
    try:
        cfg = config_from_hf(config)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{folder}/config.json: {e}") from None
    get = tensor_getter(tensors, folder, f"a {config.get('model_type', 'llama')} model")
    return cfg, params_from_tensors(get, cfg, HF, BLOCK_NAMES[config.get("model_type", "llama")],
                                    dtype)  # fmt: skip


def from_book_llama_state_dict(state_dict, cfg: LlamaConfig) -> dict:
    """gptflax Llama or Qwen3 params from the state_dict of the book's Llama3Model or Qwen3Model
    (bonus ch05/07 and ch05/11; its names are ours plus ".weight", a Qwen3Model's norms ".scale");
    with tied embeddings its out_head is not read."""
    state_dict = {_weight_suffix(k): v for k, v in state_dict.items()}
    get = tensor_getter(state_dict, "state_dict", f"a book model for {cfg}")
    qk_norm = getattr(cfg, "qk_norm", False)
    return params_from_tensors(get, cfg, BOOK, BLOCK_NAMES["qwen3" if qk_norm else "llama"])


def _weight_suffix(name: str) -> str:
    return name.removesuffix(".scale") + ".weight" if name.endswith(".scale") else name
