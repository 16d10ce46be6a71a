"""Llama-like models (Llama, Gemma 3, Qwen2 and Qwen3) from llama.cpp's GGUF files: the config
from the file's metadata, the params from its tensors (dequantized to float32 by the `gguf`
package, one tensor at a time).

Two conversions llama.cpp makes when it writes a file are undone here: a llama-architecture file
stores each head's query and key rows interleaved (for llama.cpp's rotation of neighbouring
pairs; gptflax rotates halves, as Hugging Face does), and a Gemma 3 file stores every RMSNorm
scale plus 1 (Gemma multiplies by 1 + scale).
"""

from __future__ import annotations

import numpy as np

from gptflax.config import Gemma3Config, Llama3RoPE, LlamaConfig, QwenConfig
from gptflax.gguf import GGUFFile, read_gguf
from gptflax.rope import rope_frequencies
from gptflax.weights.names import GEMMA3_BLOCK, GGUF, LLAMA_BLOCK, QK_NORM, params_from_tensors


def _shared(meta: dict, arch: str) -> dict:
    """The config fields every llama-like architecture's metadata has, under its own prefix."""
    heads = meta[f"{arch}.attention.head_count"]
    return dict(
        vocab_size=meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))),
        context_length=meta[f"{arch}.context_length"],
        emb_dim=meta[f"{arch}.embedding_length"],
        n_heads=heads,
        n_kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        hidden_dim=meta[f"{arch}.feed_forward_length"],
        n_layers=meta[f"{arch}.block_count"],
        rms_eps=float(f"{meta[f'{arch}.attention.layer_norm_rms_epsilon']:.6g}"),  # float32
        head_dim=meta.get(f"{arch}.attention.key_length"),
    )


def llama_config(meta: dict, tensors) -> LlamaConfig:
    """The LlamaConfig of a file's `llama.*` metadata (SmolLM2, Llama 2 and 3)."""
    return LlamaConfig(
        **_shared(meta, "llama"),
        rope_base=float(meta.get("llama.rope.freq_base", 10_000.0)),
        rope_scaling=Llama3RoPE() if "rope_freqs.weight" in tensors else None,
        tie_embeddings="output.weight" not in tensors,
    )


def gemma3_config(meta: dict, tensors) -> Gemma3Config:
    """The Gemma3Config of a file's `gemma3.*` metadata. Two numbers are not in the file: the
    local layers' rotary base (llama.cpp and transformers fix it at 10,000, as the config does)
    and query_pre_attn_scalar (the head size, as llama.cpp takes it for the small models)."""
    shared = _shared(meta, "gemma3")
    return Gemma3Config(
        **shared,
        query_pre_attn_scalar=float(shared["head_dim"]),
        rope_base=float(meta.get("gemma3.rope.freq_base", 1_000_000.0)),
        sliding_window=meta["gemma3.attention.sliding_window"],
    )


def qwen_config(meta: dict, tensors) -> QwenConfig:
    """The QwenConfig of a file's `qwen2.*` (biases on q/k/v) or `qwen3.*` (QK-norm) metadata."""
    arch = meta["general.architecture"]
    return QwenConfig(
        **_shared(meta, arch),
        rope_base=float(meta.get(f"{arch}.rope.freq_base", 1_000_000.0)),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
    )


# architecture -> (config from metadata, block names, what to undo in a tensor read by name)
def _unpermute_qk(cfg: LlamaConfig):
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}

    def fix(name: str, w: np.ndarray) -> np.ndarray:
        kind = name.split(".")[-2]
        return unpermute_rope_rows(w, heads[kind]) if kind in heads else w

    return fix


def _norms_minus_one(cfg) -> callable:
    return lambda name, w: w - 1.0 if name.endswith("norm.weight") else w


def _as_stored(cfg) -> callable:
    return lambda name, w: w


ARCHITECTURES = {
    "llama": (llama_config, LLAMA_BLOCK, _unpermute_qk),
    "gemma3": (gemma3_config, GEMMA3_BLOCK, _norms_minus_one),
    "qwen2": (qwen_config, LLAMA_BLOCK, _as_stored),  # rotate-half rows: nothing to undo
    "qwen3": (qwen_config, {**LLAMA_BLOCK, **QK_NORM}, _as_stored),
}


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a query or key matrix (out, in): its converter interleaves
    each head's two halves of rows (row j of the first half, then row j of the second, ...) so
    that rotating neighbour pairs equals Hugging Face's rotation of (i, i + Dh/2) pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def gguf_config(file: GGUFFile):
    """The config a GGUF file's metadata describes, for the architectures gptflax reads."""
    arch = file.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{file.path} holds a {arch!r} model; gptflax reads {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[arch][0](file.metadata, file.tensors)


def load_gguf(path, dtype=np.float32) -> tuple:
    """(config, params) of a GGUF file of a llama or gemma3 architecture."""
    file = read_gguf(path)
    cfg = gguf_config(file)
    _, block_names, undo = ARCHITECTURES[file.metadata["general.architecture"]]
    fix = undo(cfg)
    if isinstance(cfg, LlamaConfig) and cfg.rope_scaling is not None:
        _check_rope_freqs(file.dequantize("rope_freqs.weight"), cfg, path)

    def get(name: str, shape: tuple) -> np.ndarray:
        if name not in file.tensors:
            raise KeyError(f"{path} has no tensor {name!r}: is it the model it says it is?")
        w = file.dequantize(name)
        if w.shape != tuple(shape):
            raise ValueError(f"{path}: {name}: shape {w.shape}, expected {shape} for {cfg}")
        return fix(name, w)

    return cfg, params_from_tensors(get, cfg, GGUF, block_names, dtype)


def _check_rope_freqs(freq_factors: np.ndarray, cfg: LlamaConfig, path) -> None:
    """llama.cpp stores Llama 3's rescaling as a divisor per frequency: check it is ours."""
    plain = rope_frequencies(cfg.head_dim, cfg.rope_base)
    expected = plain / rope_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    if not np.allclose(freq_factors, expected, rtol=1e-3):
        raise ValueError(f"{path}: its rope_freqs are not Llama 3's rescaling; cannot load it")
