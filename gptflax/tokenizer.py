"""Tokenizers: chapter 2's simple regex tokenizers, GPT-2's BPE through tiktoken, and SmolLM2's
byte-level BPE with its ChatML chat template (built from scratch, `gptflax.bpe`, from the GGUF)."""

from __future__ import annotations

import base64
import re
from functools import cache
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

from gptflax import files
from gptflax.bpe import BPETokenizerSimple
from gptflax.config import SMOLLM2_135M

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


@cache
def gpt2_tokenizer(ranks_path: str | None = None) -> tiktoken.Encoding:
    """GPT-2's BPE tokenizer (Book §2.5), built from a local ranks file, never a download."""
    path = ranks_path or files.resolve("gpt2.tiktoken")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_bpe_ranks(path),
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=50257,
    )


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding) -> list[int]:
    """Encode text, allowing <|endoftext|> (Book §5.1)."""
    return tokenizer.encode(text, allowed_special={EOT})


def token_ids_to_text(ids, tokenizer: tiktoken.Encoding) -> str:
    """Decode a flat sequence of ids (a list or a 1-D array) back to text (Book §5.1)."""
    return tokenizer.decode([int(i) for i in ids])


# SmolLM2's chat template (ChatML) puts this system message first when the chat has none.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class ChatTokenizer(BPETokenizerSimple):
    """A byte-level BPE tokenizer with a ChatML chat template and the id that ends a reply."""

    def __init__(self, style: str, default_system: str, end_token: str = "<|im_end|>"):
        super().__init__(style)
        self.default_system, self.end_token = default_system, end_token

    @property
    def eos_id(self) -> int:
        return self.special_tokens[self.end_token]

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The text of a chat ([{"role": ..., "content": ...}, ...]) in ChatML, ending with the
        start of the assistant's turn; a system message comes first if the chat has none."""
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of `chat_prompt(messages)`, its special tokens as single ids."""
        return self.encode(self.chat_prompt(messages), allowed_special="all")


@cache
def smollm2_tokenizer(gguf_path: str | None = None) -> ChatTokenizer:
    """SmolLM2's tokenizer, from the tokens, merges and special tokens in its GGUF file."""
    from gptflax.weights import gguf_metadata, gguf_reader

    meta = gguf_metadata(gguf_reader(gguf_path or files.smollm2_gguf()))
    tokens, control = meta["tokenizer.ggml.tokens"], 3  # token type 3: a control token
    specials = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"], strict=True)
                if kind == control]  # fmt: skip
    tokenizer = ChatTokenizer("smollm2", SMOLLM2_SYSTEM)
    tokenizer.load_tokens_and_merges(tokens, meta["tokenizer.ggml.merges"], specials, "smollm2")
    return tokenizer


def tokenizer_for(cfg):
    """The tokenizer of a model's vocabulary: SmolLM2's 49,152 tokens, else GPT-2's."""
    return smollm2_tokenizer() if cfg.vocab_size == SMOLLM2_135M.vocab_size else gpt2_tokenizer()


def end_token_id(tokenizer) -> int:
    """The id that ends a text and pads a batch (Book §6.3, §7.3): GPT-2's <|endoftext|>
    (50,256), or a chat tokenizer's end of turn (SmolLM2's <|im_end|>, 2: also its padding id)."""
    return tokenizer.eos_id if isinstance(tokenizer, ChatTokenizer) else tokenizer.eot_token
