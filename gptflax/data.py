"""Input/target pairs and batching (Book §2.6) and the spam data (Book §6.2-6.3), as numpy arrays
ready for `jax.device_put`."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator

import numpy as np

from gptflax import datasets
from gptflax.tokenizer import EOT_ID, gpt2_tokenizer, text_to_token_ids


def sliding_windows(token_ids, max_length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `max_length` ids every `stride` ids, and the same shifted by one: (N, T) each."""
    ids = np.asarray(token_ids, dtype=np.int32)
    if len(ids) <= max_length:
        raise ValueError(
            f"{len(ids)} tokens are too few for max_length={max_length}: "
            f"need at least {max_length + 1}; use a longer text or a smaller max_length"
        )
    starts = np.arange(0, len(ids) - max_length, stride)  # Book §2.6: range(0, len - T, stride)
    idx = starts[:, None] + np.arange(max_length)  # (N, T)
    return ids[idx], ids[idx + 1]


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
        self, epoch: int, num_batches: int | None = None
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """The (first num_batches) batches of epoch `epoch`, without touching the epoch counter."""
        n = self.num_examples
        order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else None
        for i in range(len(self) if num_batches is None else min(num_batches, len(self))):
            idx = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if order is not None:
                idx = order[idx]
            rows = tuple(a[idx] for a in self.arrays)
            yield self.collate(*rows) if self.collate else rows

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
    """GPT-2-tokenize `txt` and batch its sliding windows: (B, T) inputs and targets (Book §2.6)."""
    ids = text_to_token_ids(txt, tokenizer or gpt2_tokenizer())
    inputs, targets = sliding_windows(ids, max_length, stride)
    return DataLoader(
        inputs, targets, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed
    )


def train_val_loaders(
    text: str, context_length: int, batch_size: int = 2, train_ratio: float = 0.9, seed: int = 123
) -> tuple[DataLoader, DataLoader]:
    """Split text by characters, then window each part with stride = context (Book §5.1.3).

    The training loader shuffles and drops the last partial batch; the validation loader keeps
    its order and every window.
    """
    split = int(train_ratio * len(text))
    args = dict(batch_size=batch_size, max_length=context_length, stride=context_length)
    train = create_dataloader_v1(text[:split], **args, shuffle=True, seed=seed)
    val = create_dataloader_v1(text[split:], **args, shuffle=False, drop_last=False)
    return train, val


# --- chapter 6: the SMS spam collection ----------------------------------------------------------


def load_sms_spam(path=None) -> list[tuple[str, str]]:
    """(label, text) rows of the SMS Spam Collection: "ham" or "spam" (Book §6.2).

    Parsed as the book's pandas call does (tab-separated, double quotes quote): 5,572 rows.
    """
    path = path or datasets.resolve("sms_spam_collection/SMSSpamCollection.tsv")
    with open(path, encoding="utf-8", newline="") as f:
        return [(label, text) for label, text in csv.reader(f, delimiter="\t")]


def _pandas_sample_order(n: int, size: int, seed: int) -> np.ndarray:
    """The row order of pandas' `df.sample(size, random_state=seed)`: RandomState.choice."""
    return np.random.RandomState(seed).choice(n, size=size, replace=False)


def balanced_spam(rows: list[tuple[str, str]], seed: int = 123) -> tuple[list[str], np.ndarray]:
    """Undersample "ham" to the number of "spam" rows: (texts, labels with spam = 1) (Book §6.2).

    Draws the same rows as the book's `df.sample(num_spam, random_state=123)`.
    """
    ham = [text for label, text in rows if label == "ham"]
    spam = [text for label, text in rows if label == "spam"]
    ham = [ham[i] for i in _pandas_sample_order(len(ham), len(spam), seed)]
    return ham + spam, np.array([0] * len(ham) + [1] * len(spam), dtype=np.int32)


def random_split(
    texts: list[str], labels: np.ndarray, train_frac: float, validation_frac: float, seed: int = 123
) -> list[tuple[list[str], np.ndarray]]:
    """Shuffle, then split into train / validation / test (Book §6.2's random_split)."""
    order = _pandas_sample_order(len(texts), len(texts), seed)
    texts, labels = [texts[i] for i in order], labels[order]
    train_end = int(len(texts) * train_frac)
    validation_end = train_end + int(len(texts) * validation_frac)
    bounds = [(0, train_end), (train_end, validation_end), (validation_end, len(texts))]
    return [(texts[a:b], labels[a:b]) for a, b in bounds]


def encode_padded(
    texts: list[str], tokenizer, max_length: int | None = None, pad_token_id: int = EOT_ID
) -> np.ndarray:
    """Token ids, cut to max_length (default: the longest text) and right-padded: (N, T) (§6.3)."""
    encoded = [tokenizer.encode(t)[:max_length] for t in texts]
    width = max_length or max(len(e) for e in encoded)
    out = np.full((len(encoded), width), pad_token_id, dtype=np.int32)
    for row, ids in zip(out, encoded, strict=True):
        row[: len(ids)] = ids
    return out


def spam_splits(seed: int = 123) -> list[tuple[list[str], np.ndarray]]:
    """The book's balanced spam data split 70/10/20: [(texts, labels)] for train, val, test."""
    return random_split(*balanced_spam(load_sms_spam(), seed), 0.7, 0.1, seed)


def spam_loaders(
    tokenizer, splits=None, batch_size: int = 8, seed: int = 123
) -> tuple[DataLoader, ...]:
    """The book's spam loaders (§6.3) over `splits` (default `spam_splits(seed)`), padded to the
    longest training text; the training loader shuffles and drops its last partial batch.
    Returns (train, val, test); each yields (B, T) token ids and (B,) labels, spam = 1."""
    splits = splits or spam_splits(seed)
    x_train = encode_padded(splits[0][0], tokenizer)
    max_length = x_train.shape[1]
    x_val, x_test = (encode_padded(texts, tokenizer, max_length) for texts, _ in splits[1:])
    return (
        DataLoader(x_train, splits[0][1], batch_size=batch_size, shuffle=True, seed=seed),
        DataLoader(x_val, splits[1][1], batch_size=batch_size, drop_last=False),
        DataLoader(x_test, splits[2][1], batch_size=batch_size, drop_last=False),
    )
