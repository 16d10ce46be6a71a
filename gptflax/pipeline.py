"""Batches of training windows streamed from token files (gptflax.tokenfiles) with grain.

    files = TokenFiles.open("runs/corpus")
    train = TokenStream(files, "train", context_length=256, batch_size=8, shuffle=True, seed=123)
    for position, (x, y) in train.epoch_batches(epochs=2):  # x, y: (B, T) int32
        ...

A window is T + 1 consecutive tokens of a split, read from the memory-mapped file when a batch
needs it: inputs are its first T, targets its last T (Book §2.6 with stride T, as chapter 5
trains). Windows either run across documents, which the end-of-text token joins (`concatenate`),
or each stays inside one document.

The pipeline is grain's: a random-access source of window ids, shuffled by grain's index shuffle
(epoch e's order depends only on the seed and e; no permutation is ever held), cut to whole
batches per epoch, batched, and only then read, each process reading only its rows of every
global batch. Memory does not grow with the corpus. A run's checkpoints record the position of
its next batch (epoch, index); the pipeline being random-access, a resumed run starts its
iterator at exactly that batch, with any number of worker processes (grain's own iterator state
changes its form with them).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import grain
import numpy as np
from absl import flags

from gptflax.data import START, Position
from gptflax.tokenfiles import TokenFiles, TokenFilesError


class Windows:
    """The training windows of one split: `len` of them, `read(ids)` -> (n, T + 1) int32.

    Concatenated, window i starts at token i*T; else document d's windows start at its offset
    plus multiples of T, as many as fit in it. Picklable (grain's worker processes open their
    own memory map)."""

    def __init__(self, files: TokenFiles, split: str, context_length: int, concatenate: bool):
        self.folder, self.manifest, self.split = files.folder, files.manifest, split
        self.T = context_length
        self.lengths = lengths = files.document_lengths(split)  # tokens of each document's part
        if concatenate:
            self.offsets = np.zeros(1, np.int64)
            self.counts = np.array([max(int(lengths.sum()) - 1, 0) // self.T], np.int64)
        else:
            self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self.counts = np.maximum(lengths - 1, 0) // self.T
        self.first = np.concatenate([[0], np.cumsum(self.counts)])  # each document's first id

    def __len__(self) -> int:
        return int(self.first[-1])

    def starts(self, ids: np.ndarray) -> np.ndarray:
        """Where windows `ids` start in the split's tokens."""
        doc = np.searchsorted(self.first, ids, side="right") - 1
        return self.offsets[doc] + (ids - self.first[doc]) * self.T

    def read(self, ids) -> np.ndarray:
        """Windows `ids` as one (n, T + 1) int32 array: only their tokens are read. The map's
        pages are then let go: they stay in the OS's page cache, but not in this process's
        resident memory, which would otherwise grow with every window read (the kernel maps
        the pages around each one read)."""
        starts = self.starts(np.asarray(ids, np.int64))
        windows = self.tokens[starts[:, None] + np.arange(self.T + 1)].astype(np.int32)
        self._map.madvise(mmap.MADV_DONTNEED)
        return windows

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read([i])[0]

    @cached_property
    def _map(self) -> mmap.mmap:
        entry = self.manifest["files"][self.split]
        with open(self.folder / entry["file"], "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    @cached_property
    def tokens(self) -> np.ndarray:
        """The split's tokens, memory-mapped."""
        return np.frombuffer(self._map, self.manifest["dtype"])

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("tokens", "_map")}


@dataclass(frozen=True)
class ReadRows:
    """A batch of window ids -> (inputs, targets), each (rows, T): only `rows` of the batch (a
    process's share of the global batch) are read."""

    windows: Windows
    rows: slice | None = None

    def __call__(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = self.windows.read(ids if self.rows is None else ids[self.rows])  # (b, T + 1)
        return w[:, :-1], w[:, 1:]


class TokenStream:
    """A split's windows in batches, with the calls of the chapter 2 `DataLoader` (`len`,
    `batches(epoch, num_batches, rows)`, `batch_size`, `num_examples`) and grain's pipeline
    over epochs (`dataset`, `epoch_batches`). Shuffled, each epoch drops its last partial
    batch; in order, it keeps every window."""

    def __init__(
        self,
        files: TokenFiles,
        split: str,
        context_length: int,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        concatenate: bool = True,
        workers: int = 0,
    ):
        self.windows = Windows(files, split, context_length, concatenate)
        self.batch_size, self.shuffle, self.seed, self.workers = batch_size, shuffle, seed, workers
        if not 0 <= seed < 2**32:
            raise ValueError(f"grain's shuffle takes seeds from 0 to 2**32 - 1, not {seed}")

    @property
    def num_examples(self) -> int:
        return len(self.windows)

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.shuffle else -(-n // b)

    def dataset(self, epochs: int, rows: slice | None = None) -> grain.MapDataset:
        """Every batch of epochs 0 to epochs - 1 as one grain MapDataset of (x, y) pairs:
        batch k is epoch k // len(self)'s batch k % len(self)."""
        n, used = self.num_examples, len(self) * self.batch_size
        ids = grain.MapDataset.range(n)
        if self.shuffle:
            ids = ids.shuffle(seed=self.seed)  # epoch e: grain's index shuffle seeded seed + e
        ids = ids.repeat(epochs)
        per_epoch = [ids[e * n : e * n + min(used, n)].batch(self.batch_size, drop_remainder=False)
                     for e in range(epochs)]  # fmt: skip
        return grain.MapDataset.concatenate(per_epoch).map(ReadRows(self.windows, rows))

    def batches(self, epoch: int, num_batches: int | None = None, rows: slice | None = None):
        """The (first num_batches) batches of epoch `epoch`, as the DataLoader gives them."""
        ds = self.dataset(epoch + 1, rows)[epoch * len(self) : (epoch + 1) * len(self)]
        for k in range(len(ds) if num_batches is None else min(num_batches, len(ds))):
            yield ds[k]

    def epoch_batches(
        self, epochs: int, start: Position = START, rows: slice | None = None
    ) -> Iterator[tuple[Position, tuple]]:
        """(position, batch) pairs from `start` to the end of epoch epochs - 1, as an
        uninterrupted run sees them, read ahead by a grain iterator (in a thread, and in
        `workers` processes when set)."""
        first = start.epoch * len(self) + start.index
        stream = self.dataset(epochs, rows)[first:].to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
        )
        if self.workers:
            flags.FLAGS.mark_as_parsed()  # grain 0.2.18 reads an absl flag (google/grain#1355)
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        iterator = iter(stream)
        try:
            for k, batch in enumerate(iterator, start=first):
                yield Position(k // len(self), k % len(self)), batch
        finally:
            if self.workers:
                iterator.close()  # its processes end with the run, not at exit


def check_windows(stream: TokenStream, name: str, every_document: bool = False) -> None:
    """A one-line TokenFilesError when a split has no window of the stream's context, or, with
    `every_document` and windows kept inside documents, when a document's part has none."""
    w = stream.windows
    lengths = w.lengths
    if every_document and len(w.offsets) > 1 and np.any((lengths > 0) & (w.counts == 0)):
        short = int(np.argmin(np.where(lengths > 0, lengths, np.iinfo(np.int64).max)))
        raise TokenFilesError(
            f"{w.manifest['documents'][short]['source']} has {lengths[short]:,} {name} tokens, "
            f"fewer than a window of {w.T} tokens and its target: train with a shorter context, "
            "let windows span documents (--concatenate), or leave that document out"
        )
    if len(w) == 0:
        raise TokenFilesError(
            f"the {name} tokens ({int(lengths.sum()):,}) hold no window of {w.T} tokens and its "
            "target: use a shorter context or more text"
        )
