"""gptflax against the book's own PyTorch code (the `llms-from-scratch` package).

Optional: needs `make setup-torch` (torch 2.13.0 CPU and llms-from-scratch); skipped without it.
"""

import importlib
from pathlib import Path

import numpy as np
import pytest

from gptflax import models
from gptflax.config import GPT_CONFIG_124M, LLAMA_TINY, QWEN3_TINY, GPTConfig
from gptflax.generate import generate
from gptflax.tokenizer import gpt2_tokenizer, text_to_token_ids
from gptflax.weights.gpt2 import from_book_state_dict

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
    np.testing.assert_allclose(models.forward(params, tokens, cfg), expected, rtol=1e-4, atol=1e-4)


def test_greedy_generation_gives_the_books_tokens():
    book, params = book_model(GPT_CONFIG_124M)  # the book's seed-123 124M model, §4.7
    encoded = np.array([text_to_token_ids("Hello, I am", gpt2_tokenizer())])
    out = generate(params, encoded, 6, GPT_CONFIG_124M)
    book_tokens = [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267]
    assert out[0].tolist() == book_tokens
    with torch.no_grad():  # and the book's own function agrees on this machine
        ref = ch04.generate_text_simple(book, torch.tensor(encoded), 6, 1024)
    assert ref[0].tolist() == book_tokens


def test_the_books_llama3_model_computes_our_llama(monkeypatch):
    """The bench's PyTorch Llama baseline: the book's Llama3Model (bonus chapter) and its KV-cached
    twin, given our weights through their state_dict names, give our logits and greedy tokens."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    baselines = importlib.import_module("baselines")
    cfg = LLAMA_TINY.replace(n_layers=3)
    book_llama, params = baselines.starting_models(cfg)
    assert book_llama.out_head.weight is book_llama.tok_emb.weight  # tied, as SmolLM2's are
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        theirs = book_llama(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(models.forward(params, x, cfg), theirs, rtol=1e-4, atol=1e-5)
    cached = baselines.book_llama_model(cfg, baselines.book_kv_llama)
    cached.load_state_dict(book_llama.state_dict())
    tokens = baselines.book_kv_generate.generate_text_simple(cached, torch.from_numpy(x), 8)
    np.testing.assert_array_equal(generate(params, x, 8, cfg), tokens.numpy())


def test_the_benchs_fused_attention_baseline_computes_the_books_model(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    baselines = importlib.import_module("baselines")
    book, _ = book_model(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4,
                                   n_layers=2, drop_rate=0.1))  # fmt: skip
    fused = baselines.with_sdpa(book).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 97, (2, 16)))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), book.eval()(x), rtol=1e-5, atol=1e-5)
    assert fused.trf_blocks[0].att.W_query.weight is not book.trf_blocks[0].att.W_query.weight


def test_the_books_batched_qwen3_model_computes_our_qwen3(monkeypatch):
    """The bench's Qwen3 baseline: the book's batched KV-cache Qwen3Model (bonus ch05/11), given
    our weights through its state_dict names, gives our logits and, decoding a batch together,
    our greedy tokens."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    baselines = importlib.import_module("baselines")
    cfg = QWEN3_TINY.replace(n_layers=3)
    book_qwen3, params = baselines.starting_models(cfg)
    assert book_qwen3.out_head.weight is book_qwen3.tok_emb.weight
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 10))
    with torch.no_grad():
        theirs = book_qwen3(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(models.forward(params, x, cfg), theirs, rtol=1e-4, atol=1e-5)
    tokens = baselines.book_batched_generate.generate_text_simple(
        book_qwen3, torch.from_numpy(x), 8
    )
    np.testing.assert_array_equal(generate(params, x, 8, cfg), tokens.numpy())
