"""Llama-like models from Hugging Face model folders (`config.json` and safetensors files), and
from the state_dict of the book's PyTorch `Llama3Model` (bonus chapter: GPT to Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gptflax.config import Llama3RoPE, LlamaConfig
from gptflax.weights import tensor_getter
from gptflax.weights.names import BOOK, HF, LLAMA_BLOCK, params_from_tensors


def llama_config_from_hf(config: dict) -> LlamaConfig:
    """The LlamaConfig of a Hugging Face `config.json` (Llama and SmolLM2 models)."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = Llama3RoPE(
            factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_context_length=rope["original_max_position_embeddings"],
        )  # fmt: skip
    n_heads = config["num_attention_heads"]
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        context_length=config["max_position_embeddings"],
        emb_dim=config["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads", n_heads),
        hidden_dim=config["intermediate_size"],
        n_layers=config["num_hidden_layers"],
        rope_base=float(config.get("rope_theta", rope.get("rope_theta", 10_000.0))),
        rope_scaling=scaling,
        rms_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=config.get("head_dim"),
    )


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


def load_hf_llama(folder, dtype=np.float32) -> tuple[LlamaConfig, dict]:
    """(config, params) of a Hugging Face Llama folder (Llama 2 and 3, SmolLM2)."""
    config, tensors = read_hf_folder(folder)
    cfg = llama_config_from_hf(config)
    get = tensor_getter(tensors, folder, "a Llama")
    return cfg, params_from_tensors(get, cfg, HF, LLAMA_BLOCK, dtype)


def from_book_llama_state_dict(state_dict, cfg: LlamaConfig) -> dict:
    """gptflax Llama params from the state_dict of the book's Llama3Model (its names are ours
    plus ".weight"); with tied embeddings its out_head is not read."""
    get = tensor_getter(state_dict, "state_dict", f"a book Llama3Model for {cfg}")
    return params_from_tensors(get, cfg, BOOK, LLAMA_BLOCK)
