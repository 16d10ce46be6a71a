"""Weights from elsewhere into gptflax params, one module per source or format:

- `gpt2`: OpenAI's GPT-2 (Hugging Face safetensors) and the book's PyTorch `GPTModel`;
- `names`: the tensor names of the Llama-like families (Llama, Gemma 3, Qwen) in Hugging Face's,
  llama.cpp's and the book's files, and params built from any of them;
- `hf`: Hugging Face model folders (config.json and safetensors), and the book's `Llama3Model`;
- `gguf`: llama.cpp's GGUF files (any quantization the `gguf` package dequantizes).

Which model comes from where, by name, is `gptflax.sources`.
"""

from __future__ import annotations

import numpy as np


def tensor_getter(tensors, source: str, model: str):
    """`get(name, shape)`: the float32 array named `name` in `tensors` (read from `source`),
    checked to have `shape`; the errors say which model the file was expected to hold."""

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise KeyError(f"{source} has no {key!r}: is it {model}?")
        value = np.asarray(tensors[key], dtype=np.float32)
        if value.shape != tuple(shape):
            raise ValueError(f"{source}: {key}: shape {value.shape}, expected {shape} for {model}")
        return value

    return get
