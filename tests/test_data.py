"""Sliding windows and batching (Book §2.6), and embeddings (§2.7-2.8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import nn
from gptflax.data import DataLoader, create_dataloader_v1, sliding_windows

pytestmark = pytest.mark.lab2


@pytest.mark.parametrize("max_length,stride", [(4, 1), (4, 4), (256, 128), (7, 3)])
def test_windows_are_shifted_pairs_at_the_stride(max_length, stride):
    ids = np.arange(1000, 1600)
    inputs, targets = sliding_windows(ids, max_length, stride)
    assert inputs.shape == targets.shape == (len(range(0, 600 - max_length, stride)), max_length)
    assert np.array_equal(inputs + 1, targets)  # ids are consecutive: target = next id
    assert np.array_equal(inputs[:, 0], 1000 + np.arange(len(inputs)) * stride)


def test_too_short_a_text_is_a_clear_error():
    with pytest.raises(ValueError, match="too few for windows of 4 tokens.*need 5"):
        sliding_windows([1, 2, 3, 4], max_length=4, stride=1)


def test_book_loader_batches(verdict_text):
    loader = create_dataloader_v1(verdict_text, batch_size=1, max_length=4, stride=1, shuffle=False)
    batches = iter(loader)
    x1, y1 = next(batches)
    x2, y2 = next(batches)
    assert x1.tolist() == [[40, 367, 2885, 1464]] and y1.tolist() == [[367, 2885, 1464, 1807]]
    assert x2.tolist() == [[367, 2885, 1464, 1807]] and y2.tolist() == [[2885, 1464, 1807, 3619]]
    assert x1.dtype == np.int32 and len(loader) == 5_145 - 4


def test_loader_length_with_and_without_drop_last():
    x = np.arange(10)
    assert len(DataLoader(x, batch_size=3, drop_last=True)) == 3
    assert len(DataLoader(x, batch_size=3, drop_last=False)) == 4
    assert [len(b) for (b,) in DataLoader(x, batch_size=3, drop_last=False)] == [3, 3, 3, 1]
    with pytest.raises(ValueError, match="differ in length"):
        DataLoader(x, x[:5], batch_size=2)


def test_shuffling_is_seeded_per_epoch_and_covers_every_example():
    x = np.arange(100)
    a = DataLoader(x, batch_size=10, shuffle=True, seed=1)
    b = DataLoader(x, batch_size=10, shuffle=True, seed=1)
    epoch0_a, epoch0_b = list(a), list(b)
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(epoch0_a, epoch0_b, strict=True))
    assert sorted(np.concatenate([p[0] for p in epoch0_a]).tolist()) == list(range(100))
    assert not np.array_equal(epoch0_a[0][0], np.arange(10))  # shuffled
    epoch1 = list(a)
    assert not np.array_equal(epoch1[0][0], epoch0_a[0][0])  # a new order each epoch
    a.set_epoch(1)
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(list(a), epoch1, strict=True))
    other_seed = list(DataLoader(x, batch_size=10, shuffle=True, seed=2))
    assert not np.array_equal(other_seed[0][0], epoch0_a[0][0])


def test_token_plus_positional_embeddings_shape(verdict_text):
    loader = create_dataloader_v1(verdict_text, batch_size=8, max_length=4, stride=4, shuffle=False)
    inputs, _ = next(iter(loader))
    tok = nn.init_embedding(jax.random.key(0), 50257, 256)
    pos = nn.init_embedding(jax.random.key(1), 4, 256)
    x = nn.embedding(tok, inputs) + nn.embedding(pos, jnp.arange(4))
    assert x.shape == (8, 4, 256)
    assert jnp.array_equal(x[3, 2], tok["embedding"][inputs[3, 2]] + pos["embedding"][2])
