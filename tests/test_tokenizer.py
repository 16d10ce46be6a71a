"""Tokenizers (Book §2.2-2.5): the book's counts and ids on the real the-verdict.txt."""

import pytest

from gptflax import files
from gptflax.tokenizer import (
    EOT,
    EOT_ID,
    UNK,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    gpt2_tokenizer,
    load_bpe_ranks,
    split_text,
    text_to_token_ids,
    token_ids_to_text,
)

pytestmark = pytest.mark.lab2


def test_split_counts_and_vocab_sizes(verdict_text):
    assert len(verdict_text) == 20_479
    assert len(split_text(verdict_text)) == 4_690
    assert len(build_vocab(verdict_text)) == 1_130
    vocab = build_vocab(verdict_text, special_tokens=(EOT, UNK))
    assert len(vocab) == 1_132 and vocab[EOT] == 1_130 and vocab[UNK] == 1_131


def test_split_keeps_punctuation_and_double_dashes():
    words = ["Hello", ",", "world", ".", "Is", "this", "--", "a", "test", "?"]
    assert split_text("Hello, world. Is this-- a test?") == words


def test_v1_round_trips_every_id_of_the_story(verdict_text):
    tok = SimpleTokenizerV1(build_vocab(verdict_text))
    ids = tok.encode(verdict_text)
    assert len(ids) == 4_690
    assert tok.encode(tok.decode(ids)) == ids


def test_v1_rejects_unknown_words_and_v2_maps_them_to_unk(verdict_text):
    with pytest.raises(KeyError):
        SimpleTokenizerV1(build_vocab(verdict_text)).encode("Hello")
    with pytest.raises(ValueError, match="<\\|unk\\|>"):
        SimpleTokenizerV2(build_vocab(verdict_text))
    tok = SimpleTokenizerV2(build_vocab(verdict_text, special_tokens=(EOT, UNK)))
    assert tok.encode("Hello palace") == [1131, 1131]


def test_bpe_book_example_ids():
    tok = gpt2_tokenizer()
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = text_to_token_ids(text, tok)
    # fmt: off
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812,
                   2114, 286, 617, 34680, 27271, 13]
    # fmt: on
    assert token_ids_to_text(ids, tok) == text


def test_bpe_on_the_verdict(verdict_text):
    tok = gpt2_tokenizer()
    ids = text_to_token_ids(verdict_text, tok)
    assert len(ids) == 5_145
    assert tok.decode(ids) == verdict_text  # byte-level BPE is lossless


def test_bpe_vocabulary_is_gpt2s():
    tok = gpt2_tokenizer()
    ranks = load_bpe_ranks(files.resolve("gpt2.tiktoken"))
    assert len(ranks) == 50_256 and sorted(ranks.values()) == list(range(50_256))
    assert tok.n_vocab == 50_257 and tok.eot_token == EOT_ID == tok.eos_id
    assert tok.bos_id is None and tok.chat is None and tok.encode("Hi", bos=True) == [17250]
    assert tok.encode(EOT, allowed_special={EOT}) == [EOT_ID]
    with pytest.raises(ValueError):  # special tokens in text must be allowed explicitly
        tok.encode(EOT)
