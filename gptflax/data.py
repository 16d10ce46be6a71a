"""Input/target pairs and batching (Book §2.6) and the spam data (Book §6.2-6.3), as numpy arrays
ready for `jax.device_put`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from gptflax.tokenizer import gpt2_tokenizer, text_to_token_ids


class Position(NamedTuple):
    """Where a batch sits in the data: its epoch and its index in that epoch's order."""

    epoch: int
    index: int


START = Position(0, 0)


def sliding_windows(token_ids, max_length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `max_length` ids every `stride` ids, and the same shifted by one: (N, T) each."""
    ids = np.asarray(token_ids, dtype=np.int32)
    if len(ids) <= max_length:
        raise ValueError(
            f"{len(ids)} tokens are too few for windows of {max_length} tokens: a window and "
            f"its shifted target need {max_length + 1}"
        )
    starts = np.arange(0, len(ids) - max_length, stride)  # Book §2.6: range(0, len - T, stride)
    idx = starts[:, None] + np.arange(max_length)  # (N, T)
    return ids[idx], ids[idx + 1]


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n: a padded width from few choices."""
    return -(-n // multiple) * multiple


def ragged(sequences: list) -> np.ndarray:
    """Sequences of different lengths as one (N,) object array, a DataLoader column that a
    `collate` function pads per batch."""
    column = np.empty(len(sequences), dtype=object)
    for i, seq in enumerate(sequences):
        column[i] = seq
    return column


class DataLoader:
    """Batches of equally long arrays; seeded shuffling (a fresh order each epoch) and drop_last.

    Iterating yields tuples of numpy arrays, one row per example, or `collate(*rows)` when given
    (e.g. to pad variable-length examples, chapter 7). The order of epoch k depends only on
    (seed, k), so a resumed run can continue with `set_epoch(k)` and see the same batches.
    """

    def __init__(
        self,
        *arrays: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = True,
        seed: int = 0,
        collate: Callable[..., tuple] | None = None,
    ):
        if len({len(a) for a in arrays}) != 1:
            raise ValueError(f"arrays differ in length: {[len(a) for a in arrays]}")
        self.arrays, self.batch_size = arrays, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.collate = collate
        self.epoch = 0

    @property
    def num_examples(self) -> int:
        return len(self.arrays[0])

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(
        self, epoch: int, num_batches: int | None = None, rows: slice | None = None
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """The (first num_batches) batches of epoch `epoch`, without touching the epoch counter;
        with `rows`, only those rows of each batch (a process's share in a multi-process run)."""
        n = self.num_examples
        order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else None
        for i in range(len(self) if num_batches is None else min(num_batches, len(self))):
            idx = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if order is not None:
                idx = order[idx]
            if rows is not None:
                idx = np.arange(n)[idx][rows]
            batch = tuple(a[idx] for a in self.arrays)
            yield self.collate(*batch) if self.collate else batch

    def epoch_batches(
        self, num_epochs: int, start: Position = START, rows: slice | None = None
    ) -> Iterator[tuple[Position, tuple]]:
        """The batches from `start` to the end of epoch num_epochs - 1, with their positions: the
        same batches, in the same order, as an uninterrupted run sees from there (what a training
        loop reads; `pipeline.TokenStream` has the same method)."""
        for epoch in range(start.epoch, num_epochs):
            skip = start.index if epoch == start.epoch else 0
            for i, batch in enumerate(self.batches(epoch, rows=rows)):
                if i >= skip:
                    yield Position(epoch, i), batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        """Iterate over the next epoch's batches."""
        self.epoch += 1
        return self.batches(self.epoch - 1)


def create_dataloader_v1(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    tokenizer=None,
) -> DataLoader:
    """Tokenize `txt` (GPT-2's tokenizer unless another is given) and batch its sliding windows:
    (B, T) inputs and targets (Book §2.6)."""
    ids = text_to_token_ids(txt, tokenizer or gpt2_tokenizer())
    inputs, targets = sliding_windows(ids, max_length, stride)
    return DataLoader(
        inputs, targets, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed
    )


def train_val_loaders(
    text: str,
    context_length: int,
    batch_size: int = 2,
    train_ratio: float = 0.9,
    seed: int = 123,
    tokenizer=None,
) -> tuple[DataLoader, DataLoader]:
    """Split text by characters, then window each part with stride = context (Book §5.1.3);
    GPT-2's tokenizer unless another is given.

    The training loader shuffles and drops the last partial batch; the validation loader keeps
    its order and every window.
    """
    split = int(train_ratio * len(text))
    args = dict(
        batch_size=batch_size, max_length=context_length, stride=context_length, tokenizer=tokenizer
    )

    def loader(part: str, name: str, **options) -> DataLoader:
        try:
            return create_dataloader_v1(part, **args, **options)
        except ValueError as e:
            raise ValueError(f"the {name}: {e}") from None

    first, last = f"{train_ratio:.0%}", f"{1 - train_ratio:.0%}"
    train = loader(
        text[:split], f"training part (the first {first} of the text)", shuffle=True, seed=seed
    )
    val = loader(text[split:], f"validation part (the last {last})", shuffle=False, drop_last=False)
    return train, val
