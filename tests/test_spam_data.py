"""The SMS spam data (Book §6.2-6.3): the book's counts, split sizes, padding and batch counts."""

import numpy as np
import pytest

from gptflax.data import DataLoader
from gptflax.finetune import (
    balanced_spam,
    encode_padded,
    load_sms_spam,
    random_split,
    spam_loaders,
    spam_splits,
)
from gptflax.tokenizer import EOT_ID, gpt2_tokenizer

pytestmark = pytest.mark.lab6


@pytest.fixture(scope="module")
def splits():
    texts, labels = balanced_spam(load_sms_spam())
    return random_split(texts, labels, 0.7, 0.1)


def test_rows_and_balance():
    rows = load_sms_spam()
    assert len(rows) == 5_572
    assert sum(label == "ham" for label, _ in rows) == 4_825
    assert sum(label == "spam" for label, _ in rows) == 747
    texts, labels = balanced_spam(rows)
    assert len(texts) == 1_494 and int(labels.sum()) == 747
    spam = {t for label, t in rows if label == "spam"}
    assert {t for t, y in zip(texts, labels, strict=True) if y == 1} == spam
    again, _ = balanced_spam(rows)
    assert again == texts  # seeded: the same ham rows every time


def test_split_sizes_and_disjointness(splits):
    assert [len(t) for t, _ in splits] == [1_045, 149, 300]
    assert sum(int(y.sum()) for _, y in splits) == 747
    all_texts = [t for texts, _ in splits for t in texts]
    assert len(all_texts) == 1_494


def test_padding_to_the_longest_training_text_and_batch_counts(splits):
    tok = gpt2_tokenizer()
    (train, y_train), (val, y_val), (test, y_test) = splits
    x_train = encode_padded(train, tok)
    assert x_train.shape == (1_045, 120)  # the book's longest training text: 120 tokens
    x_val, x_test = (encode_padded(t, tok, max_length=120) for t in (val, test))
    assert x_val.shape == (149, 120) and x_test.shape == (300, 120)
    loaders = [
        DataLoader(x_train, y_train, batch_size=8, shuffle=True, drop_last=True),
        DataLoader(x_val, y_val, batch_size=8, drop_last=False),
        DataLoader(x_test, y_test, batch_size=8, drop_last=False),
    ]
    assert [len(loader) for loader in loaders] == [130, 19, 38]
    i = int(np.argmin((x_train != EOT_ID).sum(1)))  # the shortest training text
    ids = tok.encode(train[i])
    assert x_train[i, : len(ids)].tolist() == ids and (x_train[i, len(ids) :] == EOT_ID).all()


def test_longer_texts_are_cut_to_max_length():
    tok = gpt2_tokenizer()
    out = encode_padded(["one two three four five", "six"], tok, max_length=3)
    assert out.tolist() == [tok.encode("one two three"), tok.encode("six") + [EOT_ID, EOT_ID]]


def test_spam_loaders_are_the_book_loaders(splits):
    tok = gpt2_tokenizer()
    train, val, test = spam_loaders(tok)
    assert [texts for texts, _ in spam_splits()] == [texts for texts, _ in splits]
    assert [len(loader) for loader in (train, val, test)] == [130, 19, 38]
    assert train.shuffle and train.drop_last and not val.shuffle and not test.drop_last
    np.testing.assert_array_equal(test.arrays[0], encode_padded(splits[2][0], tok, 120))
    np.testing.assert_array_equal(test.arrays[1], splits[2][1])
