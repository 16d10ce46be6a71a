"""Weights from elsewhere into gptflax params.

`load_gpt2(size)` loads OpenAI's GPT-2 weights (Book §5.5) from Hugging Face's safetensors files,
resolved through `gptflax.files` (cache, mirrors, then https://huggingface.co); no TensorFlow
needed. GPT-2 stores its linear layers as Conv1D, (in, out) like gptflax kernels, with the query,
key and value projections side by side in one `c_attn` matrix, and ties the output head to the
token embedding.

`from_book_state_dict` takes the `state_dict()` of the book's PyTorch `GPTModel` (as numpy
arrays, or anything `numpy.asarray` takes), so a model trained with the book's code can be
continued, compared or served here. PyTorch's Linear stores (out, in) weights; gptflax kernels are
(in, out), hence the transposes.

Llama models (`gptflax.llama`) load from llama.cpp's GGUF files (`load_gguf`, any quantization the
`gguf` package dequantizes; `load_smollm2()` is the SmolLM2-135M-Instruct file every machine here
can reach) and from Hugging Face safetensors folders (`load_hf_llama`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptflax import files
from gptflax.config import GPT2_PRESETS, GPTConfig, Llama3RoPE, LlamaConfig
from gptflax.llama import rope_frequencies

# gptflax names -> the book's module names, inside one transformer block.
BOOK_BLOCK_LINEARS = {
    ("att", "W_query"): "att.W_query",
    ("att", "W_key"): "att.W_key",
    ("att", "W_value"): "att.W_value",
    ("att", "out_proj"): "att.out_proj",
    ("ff", "fc1"): "ff.layers.0",
    ("ff", "fc2"): "ff.layers.2",
}


def _getter(tensors, source: str, model: str):
    """`get(name, shape)`: the float32 array named `name` in `tensors` (read from `source`),
    checked to have `shape`; the errors say which model the file was expected to hold."""

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise KeyError(f"{source} has no {key!r}: is it {model}?")
        value = np.asarray(tensors[key], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{source}: {key}: shape {value.shape}, expected {shape} for {model}")
        return value

    return get


def from_book_state_dict(state_dict, cfg: GPTConfig) -> dict:
    """gptflax params from the book's PyTorch GPTModel state_dict (Book §4.6 names)."""
    get = _getter(state_dict, "state_dict", f"a book GPTModel for {cfg}")
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


def from_hf_gpt2(tensors, cfg: GPTConfig) -> dict:
    """gptflax params from the tensors of a Hugging Face GPT-2 file (`wte.weight`, `h.0...`)."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    get = _getter(tensors, "the GPT-2 file", f"GPT-2 for {cfg}")
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


# --- Llama: GGUF files (llama.cpp) and Hugging Face safetensors ---------------------------------

# gptflax names -> Hugging Face's, llama.cpp's and the book's Llama3Model's (bonus chapter: GPT to
# Llama) inside block i ({i}); all (out, in) matrices. The `source` arguments index these tuples.
HF, GGUF, BOOK = 0, 1, 2
LLAMA_BLOCK_NAMES = {
    ("att", "W_query"): (
        "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight",
        "trf_blocks.{i}.att.W_query.weight",
    ),
    ("att", "W_key"): (
        "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight",
        "trf_blocks.{i}.att.W_key.weight",
    ),
    ("att", "W_value"): (
        "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight",
        "trf_blocks.{i}.att.W_value.weight",
    ),
    ("att", "out_proj"): (
        "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight",
        "trf_blocks.{i}.att.out_proj.weight",
    ),
    ("ff", "fc1"): (
        "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight",
        "trf_blocks.{i}.ff.fc1.weight",
    ),
    ("ff", "fc2"): (
        "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight",
        "trf_blocks.{i}.ff.fc2.weight",
    ),
    ("ff", "fc3"): (
        "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight",
        "trf_blocks.{i}.ff.fc3.weight",
    ),
    ("norm1", "scale"): (
        "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight",
        "trf_blocks.{i}.norm1.weight",
    ),
    ("norm2", "scale"): (
        "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight",
        "trf_blocks.{i}.norm2.weight",
    ),
}  # fmt: skip
LLAMA_NAMES = {  # outside the blocks
    "tok_emb": ("model.embed_tokens.weight", "token_embd.weight", "tok_emb.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight", "final_norm.weight"),
    "out_head": ("lm_head.weight", "output.weight", "out_head.weight"),
}


def llama_shapes(cfg: LlamaConfig) -> dict:
    """The (out, in) shape of each of a block's weights, under gptflax's names."""
    d, kv, h = cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    return {
        ("att", "W_query"): (d, d), ("att", "W_key"): (kv, d), ("att", "W_value"): (kv, d),
        ("att", "out_proj"): (d, d), ("ff", "fc1"): (h, d), ("ff", "fc2"): (h, d),
        ("ff", "fc3"): (d, h), ("norm1", "scale"): (d,), ("norm2", "scale"): (d,),
    }  # fmt: skip


def from_llama_tensors(get, cfg: LlamaConfig, source: int, dtype=np.float32) -> dict:
    """gptflax Llama params from named tensors, named as `source` (HF, GGUF or BOOK) names them.
    `get(name, shape)` returns the (out, in) array; kernels are its transpose."""

    def block(i: int) -> dict:
        params: dict = {"att": {}, "ff": {}, "norm1": {}, "norm2": {}}
        for (group, name), shape in llama_shapes(cfg).items():
            w = get(LLAMA_BLOCK_NAMES[group, name][source].format(i=i), shape)
            params[group][name] = w if name == "scale" else {"kernel": w.T}
        return params

    blocks = [block(i) for i in range(cfg.n_layers)]
    params = {
        "tok_emb": {
            "embedding": get(LLAMA_NAMES["tok_emb"][source], (cfg.vocab_size, cfg.emb_dim))
        },
        "trf_blocks": jax.tree.map(lambda *leaves: np.stack(leaves), *blocks),
        "final_norm": {"scale": get(LLAMA_NAMES["final_norm"][source], (cfg.emb_dim,))},
    }
    if not cfg.tie_embeddings:
        head = get(LLAMA_NAMES["out_head"][source], (cfg.vocab_size, cfg.emb_dim))
        params["out_head"] = {"kernel": head.T}
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def from_book_llama_state_dict(state_dict, cfg: LlamaConfig) -> dict:
    """gptflax Llama params from the state_dict of the book's Llama3Model (its names are ours
    plus ".weight"); with tied embeddings its out_head is not read."""
    get = _getter(state_dict, "state_dict", f"a book Llama3Model for {cfg}")
    return from_llama_tensors(get, cfg, source=BOOK)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a query or key matrix (out, in): its converter interleaves
    each head's two halves of rows (row j of the first half, then row j of the second, ...) so
    that rotating neighbour pairs equals Hugging Face's rotation of (i, i + Dh/2) pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def llama_config_from_gguf(meta: dict, tensor_names) -> LlamaConfig:
    """The LlamaConfig a GGUF file's `llama.*` metadata describes."""
    if meta.get("general.architecture") != "llama":
        raise ValueError(
            f"the GGUF file holds a {meta.get('general.architecture')!r} model; gptflax reads "
            "'llama' models (SmolLM2, Llama 2/3)"
        )
    emb_dim, n_heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    return LlamaConfig(
        vocab_size=meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))),
        context_length=meta["llama.context_length"],
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
        hidden_dim=meta["llama.feed_forward_length"],
        n_layers=meta["llama.block_count"],
        rope_base=float(meta.get("llama.rope.freq_base", 10_000.0)),
        rope_scaling=Llama3RoPE() if "rope_freqs.weight" in tensor_names else None,
        rms_eps=float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),  # float32 in GGUF
        tie_embeddings="output.weight" not in tensor_names,
    )


def gguf_reader(path):
    """A `gguf.GGUFReader` of the file, with a clear error for one that is not GGUF. Parsing
    takes seconds for a real model, so the tokenizer and the weights share one reader of an
    unchanged file (the reader maps the file; it does not hold its tensors in memory)."""
    try:
        stat = Path(path).stat()
        return _parsed_gguf(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e}); fetch it again") from e


@lru_cache(maxsize=2)
def _parsed_gguf(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def gguf_metadata(reader) -> dict:
    """A GGUF file's key-value metadata (architecture numbers, tokenizer) as Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read_gguf(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a GGUF file: every tensor dequantized to float32 numpy, in
    PyTorch's (out, in) order. Any type the `gguf` package dequantizes is read (F32, F16, BF16,
    Q8_0, Q4_0, Q4_1, the K-quants, ...)."""
    from gguf.quants import dequantize

    reader = gguf_reader(path)
    return gguf_metadata(reader), {
        t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors
    }


def load_gguf(path, dtype=np.float32) -> tuple[LlamaConfig, dict]:
    """(config, params) of a Llama-architecture GGUF file (llama.cpp's format)."""
    meta, tensors = read_gguf(path)
    cfg = llama_config_from_gguf(meta, tensors)
    if cfg.rope_scaling is not None:
        _check_rope_freqs(tensors["rope_freqs.weight"], cfg, path)
    for name, heads in (("attn_q", cfg.n_heads), ("attn_k", cfg.n_kv_heads)):
        for i in range(cfg.n_layers):
            key = f"blk.{i}.{name}.weight"
            if key in tensors:
                tensors[key] = unpermute_rope_rows(tensors[key], heads)
    return cfg, from_llama_tensors(_getter(tensors, path, "a Llama"), cfg, source=GGUF, dtype=dtype)


def _check_rope_freqs(freq_factors: np.ndarray, cfg: LlamaConfig, path) -> None:
    """llama.cpp stores Llama 3's rescaling as a divisor per frequency: check it is ours."""
    expected = rope_frequencies(cfg.replace(rope_scaling=None)) / rope_frequencies(cfg)
    if not np.allclose(freq_factors, expected, rtol=1e-3):
        raise ValueError(f"{path}: its rope_freqs are not Llama 3's rescaling; cannot load it")


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
    )


def load_hf_llama(folder, dtype=np.float32) -> tuple[LlamaConfig, dict]:
    """(config, params) from a Hugging Face model folder: `config.json` and `model.safetensors`,
    or shards listed in `model.safetensors.index.json`; bf16 files are read as they are."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        cfg = llama_config_from_hf(json.loads((folder / "config.json").read_text()))
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
            f"{folder} is not a readable Hugging Face Llama folder (config.json and safetensors "
            f"files): {e}"
        ) from e
    return cfg, from_llama_tensors(_getter(tensors, folder, "a Llama"), cfg, source=HF, dtype=dtype)


def load_smollm2(dtype=np.float32, **resolve_options) -> tuple[LlamaConfig, dict]:
    """(config, params) of SmolLM2-135M-Instruct from its GGUF file (Q8_0 embedding, Q4_1
    matrices), found by `files.smollm2_gguf()`."""
    return load_gguf(files.smollm2_gguf(**resolve_options), dtype)
