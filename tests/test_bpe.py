"""BPE from scratch (bonus ch. 2): the book's merges, GPT-2's ids, independent references."""

import random
from collections import Counter

import pytest

from gptflax import bpe
from gptflax.tokenizer import gpt2_tokenizer

pytestmark = pytest.mark.labbpe


@pytest.fixture(scope="module")
def trained(verdict_text):
    tokenizer = bpe.BPETokenizerSimple()
    tokenizer.train(verdict_text, vocab_size=1000, allowed_special={bpe.EOT})
    return tokenizer


@pytest.fixture(scope="module")
def gpt2():
    return bpe.gpt2_bpe()


def test_training_on_the_verdict_learns_the_books_742_merges(trained, verdict_text):
    assert len(trained.vocab) == 1000 and len(trained.bpe_merges) == 742
    assert trained.vocab[256] == bpe.SPACE_MARK and trained.vocab[257] == bpe.EOT
    assert sorted(trained.bpe_merges.values()) == list(range(258, 1000))
    assert not [t for t in trained.vocab.values() if bpe.SPACE_MARK in t[1:]]
    ids = trained.encode(verdict_text)
    assert trained.decode(ids) == verdict_text
    assert len(ids) < len(verdict_text) / 2  # 742 merges at least halve the story's length


def test_save_and_load_give_the_same_tokenizer(trained, tmp_path):
    text = "Jack embraced beauty through art and life. <|endoftext|> Ünïcödé 🙂"
    trained.save_vocab_and_merges(tmp_path / "vocab.json", tmp_path / "merges.json")
    reloaded = bpe.BPETokenizerSimple()
    reloaded.load_vocab_and_merges(tmp_path / "vocab.json", tmp_path / "merges.json")
    ids = trained.encode(text, allowed_special={bpe.EOT})
    assert reloaded.encode(text, allowed_special={bpe.EOT}) == ids
    assert reloaded.decode(ids) == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.json", "vocab.json"]


def recount_training(words: list[list[int]], first_id: int, vocab_size: int) -> dict:
    """Reference: recount all pairs of the whole text each step; ties to the first position."""
    merges = {}
    for new_id in range(first_id, vocab_size):
        first_at, count = {}, {}
        for w, word in enumerate(words):
            for i in range(len(word) - 1):
                pair = (word[i], word[i + 1])
                first_at.setdefault(pair, (w, i))
                count[pair] = count.get(pair, 0) + 1
        if not count:
            break
        pair = min(count, key=lambda p: (-count[p], first_at[p]))
        merges[pair] = new_id
        words = [bpe.merge_pair(word, pair, new_id) for word in words]
    return merges


@pytest.mark.parametrize("seed", range(5))
def test_local_count_updates_equal_recounting(seed):
    rng = random.Random(seed)
    words = ["aaa", "ab", "abab", "ba", "b", "aab", "bbb", "é"]
    text = " ".join(rng.choice(words) for _ in range(300))
    tokenizer = bpe.BPETokenizerSimple()
    tokenizer.train(text, vocab_size=300, allowed_special=())
    every_piece = [tokenizer.symbol_ids(p) for p in tokenizer.pretokenize(text)]
    assert tokenizer.bpe_merges == recount_training(every_piece, 257, 300)


def test_encoding_reproduces_the_segmentation_training_ended_with(trained, verdict_text):
    pieces = Counter(trained.pretokenize(verdict_text))
    words = [trained.symbol_ids(p) for p in pieces]
    assert bpe.learn_merges(words, list(pieces.values()), 258, 1000) == trained.bpe_merges
    # learn_merges merged `words` in place: they hold each piece's segmentation after training
    assert [trained.tokenize_with_bpe(p) for p in pieces] == words


def test_gpt2_files_give_tiktokens_ids_on_the_verdict(gpt2, verdict_text):
    ids = gpt2.encode(verdict_text)
    assert len(gpt2.vocab) == 50_257 and len(ids) == 5_145
    assert ids == gpt2_tokenizer().encode(verdict_text)  # the book's edge cases: lab bpe's checks


FRAGMENTS = [
    "Hello", "world", " the", "don't", "we'll", "she's", "I'M", "'ve", "n't", "1234567", "3.14",
    " 42", "x=1;", "def f(a, b):\n    return a**2", "{'k': [1, 2]}", "  ", "   ", "\t", "\n",
    "\n\n", "\r\n", " \n ", "...", "--", "!!", "@#$%", "naïve", "café", "Ωμέγα", "Привет", "中文字",
    "日本語", "한국어", "🙂", "👍🏽", "👨‍👩‍👧", "\u00a0", "\u200b", "ﬁ", "Ⅻ", "٣",
]  # fmt: skip


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Mixtures of words, contractions, digits, code, whitespace runs, scripts and emoji."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 8))]
        parts += [chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(0, 3))]
        rng.shuffle(parts)
        out.append("".join(p + rng.choice(["", " ", "  "]) for p in parts))
    return out


def test_gpt2_files_give_tiktokens_ids_on_1200_random_strings(gpt2):
    tiktoken_gpt2 = gpt2_tokenizer()
    texts = random_strings(1200)
    mismatches = [t for t in texts if gpt2.encode(t) != tiktoken_gpt2.encode(t)]
    assert not mismatches, mismatches[:3]
    assert all(gpt2.decode(gpt2.encode(t)) == t for t in texts)


def test_special_tokens_must_be_allowed(gpt2, trained):
    text = f"end{bpe.EOT}start"
    for tokenizer in (gpt2, trained):
        with pytest.raises(ValueError, match="allowed_special"):
            tokenizer.encode(text)
    assert gpt2.encode(text, allowed_special={bpe.EOT}) == gpt2_tokenizer().encode(
        text, allowed_special={bpe.EOT}
    )
    assert gpt2.encode(text, allowed_special="all").count(50256) == 1
    ids = trained.encode(text, allowed_special={bpe.EOT})
    assert ids.count(257) == 1 and trained.decode(ids) == text


def test_bad_input_gets_clear_errors(trained, tmp_path):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        trained.decode([5, 1000])
    with pytest.raises(ValueError, match="below the 258 base tokens"):
        bpe.BPETokenizerSimple().train("some text", vocab_size=100)
    with pytest.raises(ValueError, match="unknown BPE style"):
        bpe.BPETokenizerSimple(style="gpt4")
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        bpe.BPETokenizerSimple().load_vocab_and_merges(tmp_path / "vocab.json", tmp_path / "m")


def test_a_partial_character_decodes_to_the_replacement_character(gpt2):
    ids = gpt2.encode("🙂")
    assert len(ids) > 1 and gpt2.decode(ids[:1]) == "\ufffd"
