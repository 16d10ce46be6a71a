"""gptflax against the book's own PyTorch code (the `llms-from-scratch` package).

Optional: needs `make setup-torch` (torch 2.13.0 CPU and llms-from-scratch); skipped without it.
"""

import numpy as np
import pytest

from gptflax import gpt
from gptflax.config import GPT_CONFIG_124M, GPTConfig
from gptflax.generate import generate
from gptflax.tokenizer import gpt2_tokenizer, text_to_token_ids
from gptflax.weights import from_book_state_dict

torch = pytest.importorskip("torch", reason="the torch extra is not installed (make setup-torch)")
ch04 = pytest.importorskip("llms_from_scratch.ch04", reason="llms-from-scratch is not installed")

pytestmark = [pytest.mark.torch, pytest.mark.lab4]


def as_dict(cfg: GPTConfig) -> dict:
    keys = (
        "vocab_size",
        "context_length",
        "emb_dim",
        "n_heads",
        "n_layers",
        "drop_rate",
        "qkv_bias",
    )
    return {k: getattr(cfg, k) for k in keys}


def book_model(cfg: GPTConfig, seed: int = 123):
    torch.manual_seed(seed)
    book = ch04.GPTModel(as_dict(cfg))
    book.eval()
    state = {k: v.detach().numpy() for k, v in book.state_dict().items()}
    return book, from_book_state_dict(state, cfg)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_logits_equal_the_books_model(qkv_bias):
    cfg = GPTConfig(context_length=64, emb_dim=64, n_heads=4, n_layers=3, qkv_bias=qkv_bias)
    book, params = book_model(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        expected = book(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(gpt.forward(params, tokens, cfg), expected, rtol=1e-4, atol=1e-4)


def test_greedy_generation_gives_the_books_tokens():
    book, params = book_model(GPT_CONFIG_124M)  # the book's seed-123 124M model, §4.7
    encoded = np.array([text_to_token_ids("Hello, I am", gpt2_tokenizer())])
    out = generate(params, encoded, 6, GPT_CONFIG_124M)
    book_tokens = [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267]
    assert out[0].tolist() == book_tokens
    with torch.no_grad():  # and the book's own function agrees on this machine
        ref = ch04.generate_text_simple(book, torch.tensor(encoded), 6, 1024)
    assert ref[0].tolist() == book_tokens
