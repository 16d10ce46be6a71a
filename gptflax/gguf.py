"""llama.cpp's GGUF files: the metadata and the tensors, read straight from a memory map.

A GGUF file is a header (key-value metadata: the architecture's numbers, the tokenizer's tokens,
merges and scores), a table of tensors (name, shape, quantization type, offset) and the tensors'
bytes. `read_gguf` parses the first two with a few struct calls per entry and leaves the bytes in
the memory map until `dequantize` turns a tensor into float32 with the `gguf` package's quants.
(`gguf.GGUFReader` builds Python objects for every entry: 8 s for Gemma 3's 262,144 tokens here,
against 0.3 s this way.) Any cut or damaged file ends in a `GGUFError` of one line.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
# Value types of the metadata: struct formats of the scalars; 8 is a string and 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A file that is not a complete GGUF file."""


@dataclass(frozen=True)
class Tensor:
    """A tensor's entry in the table: numpy shape (outermost first), ggml type, byte offset."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the file


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: its metadata, its tensor table, and the memory map of its bytes."""

    path: str
    metadata: dict
    tensors: dict[str, Tensor]
    buffer: mmap.mmap

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 numpy, in PyTorch's (out, in) order."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors[name]
        kind = GGMLQuantizationType(t.ggml_type)
        block, block_bytes = GGML_QUANT_SIZES[kind]
        row_bytes = t.shape[-1] // block * block_bytes
        count = int(np.prod(t.shape[:-1], dtype=np.int64)) * row_bytes
        raw = np.frombuffer(self.buffer, np.uint8, count, t.offset)
        return dequantize(raw.reshape(*t.shape[:-1], row_bytes), kind).reshape(t.shape)


class _Cursor:
    """Reads little-endian values from a buffer, each bounds-checked."""

    def __init__(self, buffer, path: str):
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise GGUFError(f"{self.path} ends at byte {len(self.buffer):,}, inside its header")
        values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.take("Q")
        end = self.pos + length
        if end > len(self.buffer):
            raise GGUFError(f"{self.path} ends at byte {len(self.buffer):,}, inside its header")
        text = bytes(self.buffer[self.pos : end]).decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("I"), self.take("Q")
            if item_kind in _SCALARS and item_kind != 7:  # numbers: one numpy read
                fmt = _SCALARS[item_kind]
                values = self.take(f"{count}{fmt}") if count else ()
                return list(values) if count != 1 else [values]
            return [self.value(item_kind) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown metadata value type {kind} at byte {self.pos:,}")


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file (version 2 or 3); parsed once per process while it is unchanged."""
    try:
        stat = Path(path).stat()
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror}") from None
    return _parse(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _parse(path: str, mtime_ns: int, size: int) -> GGUFFile:
    if size < 24:
        raise GGUFError(f"{path} has {size} bytes: too short for a GGUF file; fetch it again")
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer, path)
    magic = bytes(buffer[:4])
    if magic != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    cursor.pos = 4
    version, n_tensors, n_keys = cursor.take("I"), cursor.take("Q"), cursor.take("Q")
    if version not in (2, 3):
        raise GGUFError(f"{path} is GGUF version {version}; gptflax reads versions 2 and 3")
    metadata = {}
    for _ in range(n_keys):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.take("I"))
    table = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.take("Q") for _ in range(cursor.take("I"))]
        table.append((name, tuple(reversed(dims)), cursor.take("I"), cursor.take("Q")))
    alignment = metadata.get("general.alignment", 32)
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {
        name: Tensor(name, shape, kind, data_start + offset) for name, shape, kind, offset in table
    }
    _check_sizes(path, size, tensors)
    return GGUFFile(path, metadata, tensors, buffer)


def _check_sizes(path: str, size: int, tensors: dict[str, Tensor]) -> None:
    """Every tensor's bytes lie inside the file: a cut file is found before any is read."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for t in tensors.values():
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
        except ValueError:
            raise GGUFError(f"{path}: tensor {t.name} has unknown type {t.ggml_type}") from None
        end = t.offset + int(np.prod(t.shape, dtype=np.int64)) // block * block_bytes
        if end > size:
            raise GGUFError(
                f"{path} is cut short: {size:,} bytes, but tensor {t.name} ends at byte "
                f"{end:,}; fetch the file again"
            )
