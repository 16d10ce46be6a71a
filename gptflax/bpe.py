"""Byte pair encoding from scratch (the book's bonus to chapter 2): train, encode, decode, GPT-2.

Text is cut into pieces by a pre-tokenizer regex, each piece becomes its UTF-8 bytes written as
one symbol per byte, and BPE merges adjacent symbols into longer ones. Two styles share the code:

- "book": the bonus chapter's tokenizer. Pieces are words with one leading space (plus single
  whitespace characters); ids 0-255 are the bytes (written as chr(b)), 256 is the space marker
  "Ġ", then the special tokens, then the merges learned by `train`.
- "gpt2": OpenAI's files. GPT-2's pre-tokenizer regex, its printable stand-in for each byte,
  its 50,000 ranked merges; the ids equal tiktoken's.

Encoding merges, within a piece, the pair that was learned first (lowest id) until none applies.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from itertools import pairwise
from pathlib import Path

import regex

from gptflax import files

EOT = "<|endoftext|>"
_NEVER = float("inf")  # the rank of a pair that is no merge
SPACE_MARK = "Ġ"  # GPT-2's printable stand-in for the space byte, the book's word-start marker

# The bonus chapter's pieces: a word with at most one leading space, or one whitespace character.
BOOK_PATTERN = r" ?\S+|\s"
# GPT-2's pre-tokenizer (OpenAI's encoder.py): contractions, letters, digits, other symbols,
# and whitespace runs that leave their last space to the word that follows.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's symbol for each byte: printable Latin-1 stands for itself, the rest -> chr(256+n)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


# style -> (pre-tokenizer, symbol of each byte).
STYLES = {
    "book": (BOOK_PATTERN, [SPACE_MARK if b == 32 else chr(b) for b in range(256)]),
    "gpt2": (GPT2_PATTERN, gpt2_byte_symbols()),
}


class BPETokenizerSimple:
    """A byte-level BPE tokenizer with the book's method names (bonus ch. 2, §5)."""

    def __init__(self, style: str = "book"):
        self.vocab: dict[int, str] = {}  # id -> token string, e.g. {11246: "some"}
        self.inverse_vocab: dict[str, int] = {}
        self.bpe_merges: dict[tuple[int, int], int] = {}  # (left id, right id) -> merged id
        self.special_tokens: dict[str, int] = {}
        self._set_style(style)

    def _set_style(self, style: str) -> None:
        if style not in STYLES:
            raise ValueError(f"unknown BPE style {style!r}; use one of {', '.join(STYLES)}")
        pattern, symbols = STYLES[style]
        self.style, self._pattern, self._symbols = style, regex.compile(pattern), symbols
        self._byte_of = {chr(b): b for b in range(256)} if style == "book" else {}
        self._byte_of |= {s: b for b, s in enumerate(symbols)}
        self._cache: dict[str, list[int]] = {}

    def _set_vocab(self, vocab: dict[int, str], specials: Iterable[str]) -> None:
        self.vocab = vocab
        self.inverse_vocab = {token: i for i, token in vocab.items()}
        self.special_tokens = {token: self.inverse_vocab[token] for token in specials}
        self._cache.clear()

    # --- training -------------------------------------------------------------------------------

    def train(self, text: str, vocab_size: int, allowed_special: Collection[str] = (EOT,)) -> None:
        """Learn merges from `text` until the vocabulary holds `vocab_size` tokens."""
        self._set_style("book")
        vocab = {b: chr(b) for b in range(256)} | {256: SPACE_MARK}
        for token in sorted(allowed_special):
            vocab[len(vocab)] = token
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab)} base tokens")
        self._set_vocab(vocab, allowed_special)
        pieces = Counter(
            piece
            for chunk, is_special in self._split_special(text, allowed_special)
            if not is_special
            for piece in self.pretokenize(chunk)
        )
        words = [self.symbol_ids(piece) for piece in pieces]
        self.bpe_merges = learn_merges(words, list(pieces.values()), len(vocab), vocab_size)
        for (left, right), new_id in self.bpe_merges.items():
            vocab[new_id] = vocab[left] + vocab[right]
        self._set_vocab(vocab, allowed_special)

    # --- encoding and decoding ------------------------------------------------------------------

    def encode(self, text: str, allowed_special: Collection[str] | str = frozenset()) -> list[int]:
        """Token ids of `text`; special tokens in it must be in `allowed_special` (or "all")."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if found := [t for t in self.special_tokens if t in text and t not in allowed]:
            raise ValueError(
                f"the text contains the special token {found[0]!r}; pass "
                f"allowed_special={{{found[0]!r}}} to encode it as one token"
            )
        ids: list[int] = []
        for chunk, is_special in self._split_special(text, allowed & set(self.special_tokens)):
            if is_special:
                ids.append(self.special_tokens[chunk])
            else:
                for piece in self.pretokenize(chunk):
                    ids.extend(self.tokenize_with_bpe(piece))
        return ids

    def tokenize_with_bpe(self, piece: str) -> list[int]:
        """Ids of one pre-tokenized piece: apply the earliest-learned merge until none applies."""
        if (cached := self._cache.get(piece)) is not None:
            return cached
        ids = self.symbol_ids(piece)
        while len(ids) > 1:
            pair = min(pairwise(ids), key=lambda p: self.bpe_merges.get(p, _NEVER))
            if pair not in self.bpe_merges:
                break
            ids = merge_pair(ids, pair, self.bpe_merges[pair])
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids (invalid UTF-8 from a partial character becomes U+FFFD)."""
        out = bytearray()
        for i in ids:
            token = self.vocab.get(int(i))
            if token is None:
                raise ValueError(
                    f"token id {i} is not in the vocabulary (ids 0-{len(self.vocab) - 1})"
                )
            if token in self.special_tokens:
                out += token.encode("utf-8")
            else:
                out += bytes(self._byte_of[s] for s in token)
        return out.decode("utf-8", errors="replace")

    def pretokenize(self, text: str) -> list[str]:
        """Cut text into the pieces that BPE works inside (merges never cross two pieces)."""
        return self._pattern.findall(text)

    def symbol_ids(self, piece: str) -> list[int]:
        """The base ids of a piece: one per UTF-8 byte, before any merge (a byte the vocabulary
        lacks is left out, as Hugging Face's BPE does without an unknown token)."""
        symbols = (self._symbols[b] for b in piece.encode("utf-8"))
        return [self.inverse_vocab[s] for s in symbols if s in self.inverse_vocab]

    @staticmethod
    def _split_special(text: str, specials: Collection[str]) -> list[tuple[str, bool]]:
        """Cut text around the given special tokens: [(chunk, is_special), ...]."""
        if not specials:
            return [(text, False)]
        longest_first = sorted(specials, key=len, reverse=True)
        parts = regex.split("(" + "|".join(map(regex.escape, longest_first)) + ")", text)
        return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]

    # --- files ----------------------------------------------------------------------------------

    def save_vocab_and_merges(self, vocab_path: str | Path, bpe_merges_path: str | Path) -> None:
        """Write the vocabulary and the merges as JSON (each file replaced whole, never half)."""
        files.save_json({str(i): token for i, token in self.vocab.items()}, vocab_path)
        merges = [{"pair": list(pair), "new_id": new} for pair, new in self.bpe_merges.items()]
        meta = {"style": self.style, "special_tokens": list(self.special_tokens)}
        files.save_json(meta | {"merges": merges}, bpe_merges_path)

    def load_vocab_and_merges(self, vocab_path: str | Path, bpe_merges_path: str | Path) -> None:
        """Read what `save_vocab_and_merges` wrote."""
        vocab = {int(i): token for i, token in _read_json(vocab_path).items()}
        saved = _read_json(bpe_merges_path)
        self._set_style(saved["style"])
        self.bpe_merges = {tuple(m["pair"]): m["new_id"] for m in saved["merges"]}
        self._set_vocab(vocab, saved["special_tokens"])

    def load_vocab_and_merges_from_openai(
        self, vocab_path: str | Path, bpe_merges_path: str | Path
    ) -> None:
        """Load GPT-2's `encoder.json` (token -> id) and `vocab.bpe` (merges, by rank)."""
        encoder = _read_json(vocab_path)
        lines = Path(bpe_merges_path).read_text(encoding="utf-8").splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
        tokens = [token for token, _ in sorted(encoder.items(), key=lambda item: item[1])]
        self.load_tokens_and_merges(tokens, merges, [EOT], "gpt2", source=bpe_merges_path)

    def load_tokens_and_merges(
        self, tokens: list[str], merges: list[str], specials, style: str, source=""
    ) -> None:
        """Load a byte-level BPE given as its tokens (token i has id i), its merges ("left right"
        strings, by rank) and its special tokens, as GGUF files and Hugging Face store them."""
        self._set_style(style)
        self._set_vocab(dict(enumerate(tokens)), specials)
        ids = self.inverse_vocab
        self.bpe_merges = {(ids[a], ids[b]): ids[a + b] for a, b in (m.split(" ") for m in merges)}
        # Encoding takes the lowest merged id as the highest-ranked merge: check that it is so.
        if list(self.bpe_merges.values()) != sorted(self.bpe_merges.values()):
            raise ValueError(f"{source}: merged ids do not follow the merges' rank order")


def gpt2_bpe() -> BPETokenizerSimple:
    """GPT-2's tokenizer, from scratch, loaded from OpenAI's files (cache, mirrors or download)."""
    tokenizer = BPETokenizerSimple()
    tokenizer.load_vocab_and_merges_from_openai(
        files.resolve("gpt2/encoder.json"), files.resolve("gpt2/vocab.bpe")
    )
    return tokenizer


def _read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}") from None


# --- the training algorithm -----------------------------------------------------------------------


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def learn_merges(
    words: list[list[int]], freqs: list[int], first_id: int, vocab_size: int
) -> dict[tuple[int, int], int]:
    """BPE training on distinct words (in order of first appearance) with their counts.

    Each step merges the most frequent adjacent pair; ties go to the pair seen first in the text,
    as the book's Counter does. Pair counts are kept and updated only in the words a merge touches.
    """
    counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words holding it
    for w, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair, n in Counter(pairwise(word)).items():
            counts[pair] += n * freq
            where[pair].add(w)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    merges: dict[tuple[int, int], int] = {}
    for new_id in range(first_id, vocab_size):
        pair = _most_frequent_pair(heap, counts, where, words)
        if pair is None:
            break
        merges[pair] = new_id
        for w in where.pop(pair):
            old, words[w] = words[w], merge_pair(words[w], pair, new_id)
            _update_counts(counts, where, heap, w, old, words[w], freqs[w])
    return merges


def _most_frequent_pair(heap, counts, where, words) -> tuple[int, int] | None:
    """Pop the most frequent pair (ties: first seen) off a heap that may hold stale counts."""
    while heap and counts.get(heap[0][1]) != -heap[0][0]:
        heapq.heappop(heap)
    if not heap:
        return None
    top, tied = heap[0][0], set()
    while heap and heap[0][0] == top:
        _, pair = heapq.heappop(heap)
        if counts.get(pair) == -top:
            tied.add(pair)
    best = min(tied, key=lambda pair: _first_seen(pair, where[pair], words))
    for pair in tied - {best}:
        heapq.heappush(heap, (top, pair))
    return best


def _first_seen(pair, holders: set[int], words) -> tuple[int, int]:
    """(word index, position) of the pair's first occurrence in the text."""
    w = min(holders)
    word = words[w]
    return w, next(i for i in range(len(word) - 1) if (word[i], word[i + 1]) == pair)


def _update_counts(counts, where, heap, w, old, new, freq) -> None:
    """Move one word's pair counts from its old symbols to its new ones."""
    old_pairs, new_pairs = Counter(pairwise(old)), Counter(pairwise(new))
    for pair in old_pairs.keys() - new_pairs.keys():
        where[pair].discard(w)
    for pair in new_pairs:
        where[pair].add(w)
    delta = new_pairs
    delta.subtract(old_pairs)
    for pair, d in delta.items():
        if d:
            counts[pair] += d * freq
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], pair))
            else:
                del counts[pair]
