"""Tokenizers: chapter 2's simple regex tokenizers, GPT-2's BPE through tiktoken, and the other
models' byte pair encodings as fast tokenizers (Hugging Face's `tokenizers`), built from what their
GGUF file holds (tokens, merges or scores, special tokens) or from a tokenizer.json.

Every model's tokenizer answers the same calls: `encode(text)`, `decode(ids)`, `eos_id` (ends a
text or a reply; pads batches, Book §6.3, §7.3), `bos_id` (None, or the id a sequence starts
with: `encode(text, bos=True)`), `n_vocab` and `chat` (its `ChatTemplate`, or None). Byte pair
encoding from scratch, the book's bonus, is `gptflax.bpe` (lab bpe)."""

from __future__ import annotations

import base64
import re
import threading
from functools import cache
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

from gptflax import files
from gptflax.chat import ChatTemplate

UNK, EOT = "<|unk|>", "<|endoftext|>"
EOT_ID = 50256  # GPT-2's id of <|endoftext|>

SPLIT_PATTERN = r'([,.:;?_!"()\']|--|\s)'  # Book §2.2
_SPACE_BEFORE_PUNCT = r'\s+([,.?!"()\'])'


def split_text(text: str) -> list[str]:
    """Split text into words and punctuation, dropping whitespace (Book §2.2)."""
    return [item.strip() for item in re.split(SPLIT_PATTERN, text) if item.strip()]


def build_vocab(text: str, special_tokens: tuple[str, ...] = ()) -> dict[str, int]:
    """Map each distinct token of `text`, sorted, then `special_tokens`, to an id (Book §2.3)."""
    words = sorted(set(split_text(text))) + list(special_tokens)
    return {token: i for i, token in enumerate(words)}


class SimpleTokenizerV1:
    """Regex tokenizer over a fixed vocabulary; unknown words are an error (Book §2.3)."""

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = vocab
        self.int_to_str = {i: s for s, i in vocab.items()}

    def encode(self, text: str) -> list[int]:
        return [self.str_to_int[s] for s in self._tokens(text)]

    def decode(self, ids: list[int]) -> str:
        text = " ".join(self.int_to_str[i] for i in ids)
        return re.sub(_SPACE_BEFORE_PUNCT, r"\1", text)

    def _tokens(self, text: str) -> list[str]:
        return split_text(text)


class SimpleTokenizerV2(SimpleTokenizerV1):
    """V1 that maps unknown words to <|unk|> (Book §2.4); the vocab must hold <|unk|>."""

    def __init__(self, vocab: dict[str, int]):
        if UNK not in vocab:
            raise ValueError(f"SimpleTokenizerV2 needs {UNK!r} in its vocabulary")
        super().__init__(vocab)

    def _tokens(self, text: str) -> list[str]:
        return [s if s in self.str_to_int else UNK for s in split_text(text)]


def load_bpe_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken ranks file: one `base64(token) rank` pair a line."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class GPT2Tokenizer(tiktoken.Encoding):
    """GPT-2's tiktoken encoding, answering the calls every gptflax tokenizer answers."""

    bos_id = None
    chat = None

    @property
    def eos_id(self) -> int:
        return self.eot_token

    def encode(
        self, text: str, *, allowed_special=frozenset(), disallowed_special="all", bos=False
    ):
        """tiktoken's encode (GPT-2 starts no sequence with a special token: `bos` adds none)."""
        return super().encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )


@cache
def gpt2_tokenizer(ranks_path: str | None = None) -> GPT2Tokenizer:
    """GPT-2's BPE tokenizer (Book §2.5), built from a local ranks file, never a download."""
    path = ranks_path or files.resolve("gpt2.tiktoken")
    return GPT2Tokenizer(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_bpe_ranks(path),
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=50257,
    )


def text_to_token_ids(text: str, tokenizer) -> list[int]:
    """Encode text, allowing <|endoftext|> (Book §5.1)."""
    return tokenizer.encode(text, allowed_special={EOT})


def token_ids_to_text(ids, tokenizer) -> str:
    """Decode a flat sequence of ids (a list or a 1-D array) back to text (Book §5.1)."""
    return tokenizer.decode([int(i) for i in ids])


class FastTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` with the calls of GPT-2's tiktoken tokenizer.

    Special tokens written in a text (e.g. "<|im_end|>") are read as their single ids only where
    `allowed_special` allows them, as tiktoken does; elsewhere they are ordinary text. A fast
    tokenizer reads all of them or none: any `allowed_special` but an empty one means all."""

    def __init__(
        self, tokenizer, *, eos: str, bos: str | None = None, chat: ChatTemplate | None = None
    ):
        self.tokenizer, self.chat = tokenizer, chat
        self.eos_id = self._id(chat.end_token if chat else eos)
        self.bos_id = self._id(bos) if bos is not None else None
        self.n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        self._lock = threading.Lock()  # encode_special_tokens is the tokenizer's state

    def _id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no token {token!r}")
        return token_id

    def encode(self, text: str, *, allowed_special=frozenset(), bos: bool = False) -> list[int]:
        """Token ids of `text`, after `bos_id` when `bos` is set and the model has one."""
        with self._lock:
            self.tokenizer.encode_special_tokens = not allowed_special
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_chat(self, messages: list[dict], **render) -> list[int]:
        """Token ids of a chat written in the model's template (`ChatTemplate.render` options)."""
        if self.chat is None:
            raise ValueError("this model has no chat template: it continues text, not chats")
        return self.encode(self.chat.render(messages, **render), allowed_special="all")


# Pre-tokenizer regexes, by GGUF's `tokenizer.ggml.pre` (as llama.cpp names them).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CONTROL, USER_DEFINED = 3, 4  # GGUF token types of special tokens


def tokenizer_from_gguf(meta: dict, chat: ChatTemplate | None = None) -> FastTokenizer:
    """The fast tokenizer a GGUF file's metadata describes: byte-level BPE with merges
    (`tokenizer.ggml.model` "gpt2": SmolLM2, Qwen2) or SentencePiece's BPE with scores
    ("llama": Gemma 3)."""
    kind = meta.get("tokenizer.ggml.model")
    build = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}.get(kind)
    if build is None:
        raise ValueError(f"gptflax reads GGUF tokenizers of kind gpt2 and llama, not {kind!r}")
    tokenizer = build(meta)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False)
         for t, kind in zip(tokens, types, strict=True) if kind in (CONTROL, USER_DEFINED)]
    )  # fmt: skip
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return FastTokenizer(
        tokenizer,
        eos=tokens[meta["tokenizer.ggml.eos_token_id"]],
        bos=tokens[bos] if bos is not None and meta.get("tokenizer.ggml.add_bos_token") else None,
        chat=chat,
    )


def _byte_level_bpe(meta: dict):
    """GPT-2's kind of BPE: each byte a symbol, merges in rank order, a regex splitting words."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    split = {"qwen2": QWEN2_SPLIT}.get(pre, GPT2_SPLIT)
    steps = [pre_tokenizers.Split(Regex(split), behavior="isolated")]
    if pre == "smollm":  # SmolLM2: every digit a word of its own first
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict):
    """SentencePiece's BPE (Gemma): spaces written as "▁", pieces merged in the order of their
    scores (the merges are read off the vocabulary: every split of a piece into two pieces), and
    bytes of characters outside the vocabulary as <0xNN> tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for piece, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                candidates.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    candidates.sort()
    merges = [(left, right) for *_, left, right in candidates]
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def tokenizer_from_json(path, *, eos: str, bos: str | None = None, chat=None) -> FastTokenizer:
    """A fast tokenizer saved as a Hugging Face tokenizer.json (e.g. Qwen3's)."""
    from tokenizers import Tokenizer

    return FastTokenizer(Tokenizer.from_file(str(path)), eos=eos, bos=bos, chat=chat)
