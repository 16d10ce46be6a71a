"""Classification fine-tuning (Book ch. 6): the spam data, a new output head, a mostly frozen
body, and accuracy read from the last token (or the last real token, before the padding). The
classification logits and loss are in `gptflax.losses`; everything here works for any family."""

from __future__ import annotations

import csv
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptflax import files, nn
from gptflax.data import DataLoader
from gptflax.losses import classification_logits


def replace_out_head(params: dict, key: jax.Array, num_classes: int = 2) -> dict:
    """Swap the (D, vocab) output layer for a fresh (D, num_classes) one with a bias (§6.5)."""
    emb_dim = params["tok_emb"]["embedding"].shape[1]
    return {**params, "out_head": nn.init_linear(key, emb_dim, num_classes)}


def trainable_mask(params: dict, n_last_blocks: int = 1) -> dict:
    """1 where a parameter trains, 0 where it is frozen: the last n blocks, the final norm and the
    head, as the book's requires_grad settings (§6.5). Block leaves are stacked, so their mask is
    per layer: shape (n_layers, 1, ..., 1)."""

    def block_mask(leaf):
        n_layers = leaf.shape[0]
        on = jnp.arange(n_layers) >= n_layers - n_last_blocks
        return on.reshape((n_layers,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)

    mask = jax.tree.map(lambda leaf: jnp.zeros((), leaf.dtype), params)
    mask["trf_blocks"] = jax.tree.map(block_mask, params["trf_blocks"])
    for name in ("final_norm", "out_head"):
        mask[name] = jax.tree.map(lambda leaf: jnp.ones((), leaf.dtype), params[name])
    return mask


def count_trainable(params: dict, mask: dict) -> int:
    """How many scalars the mask lets train."""
    counts = jax.tree.map(lambda p, m: int(jnp.broadcast_to(m, p.shape).sum()), params, mask)
    return sum(jax.tree.leaves(counts))


def freeze(mask: dict) -> optax.GradientTransformation:
    """Zero the updates of frozen parameters; chain it after the optimizer, so that weight decay
    cannot move them either (torch skips parameters without gradients entirely)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * m, updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def calc_accuracy_loader(
    params: dict,
    loader,
    cfg,
    num_batches: int | None = None,
    pad_token_id: int | None = None,
) -> float:
    """Correct predictions / examples over the (first num_batches) batches (Book §6.6)."""
    correct = examples = 0
    for tokens, labels in loader.batches(0, num_batches):
        correct += int(_num_correct(params, tokens, labels, cfg, pad_token_id))
        examples += len(labels)
    return correct / examples


@partial(jax.jit, static_argnames="pad_token_id")
def _num_correct(params, tokens, labels, cfg, pad_token_id):
    logits = classification_logits(params, tokens, cfg, pad_token_id=pad_token_id)
    return (logits.argmax(axis=-1) == labels).sum()


def classify_review(
    text: str, params: dict, tokenizer, cfg, max_length: int, at_last_real_token: bool = False
) -> str:
    """ "spam" or "not spam" for one text, padded like the training data and read at the last
    position (Book §6.8), or at its last real token."""
    pad_token_id = tokenizer.eos_id
    ids = tokenizer.encode(text, bos=True)[: min(max_length, cfg.context_length)]
    tokens = jnp.array([ids + [pad_token_id] * (max_length - len(ids))])
    read_at = pad_token_id if at_last_real_token else None
    logits = classification_logits(params, tokens, cfg, pad_token_id=read_at)
    return "spam" if int(logits.argmax(axis=-1)[0]) == 1 else "not spam"


# --- the data: the SMS spam collection (Book §6.2-6.3) --------------------------------------------


def load_sms_spam(path=None) -> list[tuple[str, str]]:
    """(label, text) rows of the SMS Spam Collection: "ham" or "spam" (Book §6.2).

    Parsed as the book's pandas call does (tab-separated, double quotes quote): 5,572 rows.
    """
    path = path or files.resolve("sms_spam_collection/SMSSpamCollection.tsv")
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


def encode_padded(texts: list[str], tokenizer, max_length: int | None = None) -> np.ndarray:
    """Token ids, cut to max_length (default: the longest text) and right-padded with the
    tokenizer's end token: (N, T) (§6.3)."""
    encoded = [tokenizer.encode(t, bos=True)[:max_length] for t in texts]
    width = max_length or max(len(e) for e in encoded)
    out = np.full((len(encoded), width), tokenizer.eos_id, dtype=np.int32)
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
