"""Streaming decoding: tokens as they are decoded, one jitted KV-cache step each, and chat sessions
that keep their KV cache from turn to turn.

A `Decoder` holds one sequence: `feed(ids)` runs new tokens through the model (their keys and
values join the cache) and returns the logits after the last; `tokens(...)` yields the tokens it
samples, each the result of one jitted step (decode the previous token, sample the next) that
updates the cache in place. The cache grows by doubling as the sequence does, so a step reads
about as many slots as the text holds, not the whole context. `ChatSession` renders the chat in
the model's template each turn, feeds only what the cache lacks, and streams the reply as text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gptflax import models
from gptflax.attention import KVCache
from gptflax.decoding import decoding_params, params_dict
from gptflax.generate import (
    next_token_logits,
    padded_window,
    penalize_repeats,
    sample_next_token,
    window_width,
)


@jax.tree_util.register_static
@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else sampled from the logits over
    temperature, after the top-k and top-p filters; `repetition_penalty` above 1 makes tokens
    already in the answer less likely (without it, small models repeat themselves)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(
                f"temperature: must be a finite number, 0 or more, not {self.temperature}"
            )
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: must be above 0, not {self.repetition_penalty}")

    def pick(self, logits: jax.Array, seen: jax.Array, key: jax.Array) -> jax.Array:
        """(V,) logits -> the next id, a () int32."""
        if self.repetition_penalty != 1.0:
            logits = penalize_repeats(logits, seen, self.repetition_penalty)
        key = key if self.temperature > 0 else None
        return sample_next_token(logits[None], key, self.temperature, self.top_k, self.top_p)[0]


CHAT_SAMPLING = Sampling(temperature=0.3, top_p=0.9, repetition_penalty=1.1)  # measured: no loops


class Decoder:
    """KV-cached decoding of one sequence, token by token (see the module's docstring)."""

    def __init__(self, params: dict, cfg, capacity: int = 256):
        self.params, self.cfg = decoding_params(params), cfg  # laid out once for every step
        self.capacity, self.dtype = min(capacity, cfg.context_length), params_dtype(params)
        self.cache = models.init_cache(cfg, 1, self.capacity, self.dtype)
        self.ids: list[int] = []  # the tokens whose keys and values are in the cache
        self.seen = jnp.zeros(cfg.vocab_size, bool)  # the tokens sampled so far in a stream

    def rewind(self, keep: int) -> None:
        """Keep only the first `keep` tokens: the cache forgets the positions after them. A
        sliding-window ring that has wrapped no longer holds the positions before its window,
        and a recurrent state (Gated DeltaNet) cannot forget, so then the kept tokens are run
        through the model again."""
        self._recover()
        if keep >= len(self.ids):
            return
        wrapped = any(c is not None and (not isinstance(c, KVCache) or (
            c.keys.shape[2] < len(self.ids) and self.cfg.cache_window(i)))
            for i, c in enumerate(self.cache))  # fmt: skip
        kept, self.ids = self.ids[:keep], self.ids[:keep]
        self.cache = _forget_after(self.cache, keep)
        if wrapped:
            self.ids, self.cache = [], _forget_after(self.cache, 0)
            if kept:
                self.feed(kept)

    def feed(self, ids: list[int]) -> jax.Array:
        """Run `ids` through the model after the cached tokens: the logits after the last, (V,)."""
        self._recover()
        start, n = len(self.ids), len(ids)
        if start + n > self.cfg.context_length:
            raise ValueError(
                f"{start + n} tokens exceed the context length of {self.cfg.context_length}"
            )
        self._make_room(start + n)
        width = window_width(n, self.cfg.context_length)  # few distinct widths: few compiles
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :n] = ids
        positions = np.where(np.arange(width) < n, start + np.arange(width), -1)[None]
        logits, self.cache = _prefill(self.params, tokens, self.cache, positions, n - 1, self.cfg)
        self.ids += list(ids)
        return logits

    def tokens(self, logits, max_new: int, sampling: Sampling, key, stop=()) -> Iterator[int]:
        """Sample up to max_new tokens after `logits` (what `feed` returned), each fed back; stop
        after a token in `stop` (it is yielded, not fed). Token i draws from fold_in(key, i); the
        repetition penalty counts the tokens of this stream only (not the prompt's)."""
        self.seen = jnp.zeros_like(self.seen)
        token = int(_pick(logits, self.seen, jax.random.fold_in(key, 0), sampling))
        for i in range(1, max_new + 1):
            yield token
            if token in stop or i == max_new or len(self.ids) >= self.cfg.context_length:
                return
            self._make_room(len(self.ids) + 1)
            step_key = jax.random.fold_in(key, i)
            next_id, self.cache, self.seen = _step(
                self.params, self.cache, self.seen, token, len(self.ids), step_key, self.cfg,
                sampling,
            )  # fmt: skip
            self.ids.append(token)
            token = int(next_id)

    def _make_room(self, length: int) -> None:
        self.capacity, self.cache = with_room(self.cache, self.cfg, self.capacity, length)

    def _recover(self) -> None:
        """A step stopped by Ctrl-C after it took the cache (donated) but before it gave the new
        one back leaves buffers that are gone: the cache is built again from the tokens kept."""
        if not any(leaf.is_deleted() for leaf in jax.tree.leaves(self.cache)):
            return
        kept, self.ids = self.ids, []
        self.cache = models.init_cache(self.cfg, 1, self.capacity, self.dtype)
        if kept:
            self.feed(kept)


@partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def _prefill(params, tokens, cache, positions, last, cfg):
    h, cache = models.hidden_cached(params, tokens, cache, positions, cfg)
    return models.head(params, h[0, last]), cache


@partial(jax.jit, static_argnames="sampling")
def _pick(logits, seen, key, sampling):
    return sampling.pick(logits, seen, key)


@partial(jax.jit, static_argnames=("cfg", "sampling"), donate_argnames="cache")
def _step(params, cache, seen, token, position, key, cfg, sampling):
    """Feed one token at `position`, pick the next: (next id, cache, seen)."""
    tokens = jnp.reshape(token, (1, 1)).astype(jnp.int32)
    h, cache = models.hidden_cached(params, tokens, cache, jnp.reshape(position, (1, 1)), cfg)
    seen = seen.at[token].set(True)
    return sampling.pick(models.head(params, h[0, 0]), seen, key), cache, seen


def stream_tokens(
    params: dict,
    ids: list[int],
    max_new_tokens: int,
    cfg,
    *,
    sampling: Sampling = Sampling(),
    key: jax.Array | None = None,
    eos_id: int | None = None,
) -> Iterator[int]:
    """One sequence's new tokens, each as soon as it is decoded (the eos token is the last). With
    the KV cache while prompt and new tokens fit in the context; beyond it, the book's sliding
    window: every new token runs the last context_length tokens through the model again."""
    key = jax.random.key(0) if key is None else key
    stop = () if eos_id is None else (eos_id,)
    if len(ids) + max_new_tokens <= cfg.context_length:
        decoder = Decoder(params, cfg, capacity=window_width(len(ids) + max_new_tokens, 1 << 30))
        yield from decoder.tokens(decoder.feed(ids), max_new_tokens, sampling, key, stop)
        return
    seq, seen = list(ids), jnp.zeros(cfg.vocab_size, bool)
    for i in range(max_new_tokens):
        window, length = padded_window(np.array([seq]), cfg.context_length)
        logits = next_token_logits(params, jnp.asarray(window), length, cfg)[0]
        token = int(_pick(logits, seen, jax.random.fold_in(key, i), sampling))
        yield token
        if token in stop:
            return
        seq.append(token)
        seen = seen.at[token].set(True)


def with_room(cache: tuple, cfg, capacity: int, length: int) -> tuple[int, tuple]:
    """(capacity, cache) that hold `length` positions: the capacity doubled as often as needed
    (at most the context) and the cache grown to it; as they were if they hold it already."""
    if length <= capacity:
        return capacity, cache
    while capacity < length:
        capacity *= 2
    capacity = min(capacity, cfg.context_length)
    return capacity, grown_cache(cache, cfg, capacity)


def grown_cache(cache: tuple, cfg, length: int) -> tuple:
    """The cache with `length` slots a layer (its window's, for a sliding one): the new slots
    empty. Positions so far are below the old size, so each stays in its slot. A recurrent
    state (not a `KVCache`), or a layer that reads another's (None), stays as it is."""
    grown = []
    for i, layer in enumerate(cache):
        if not isinstance(layer, KVCache):
            grown.append(layer)
            continue
        extra = min(length, cfg.cache_window(i) or length) - layer.keys.shape[2]
        pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
        positions = jnp.pad(layer.positions, [(0, 0), (0, extra)], constant_values=-1)
        slots = ("keys", "values") + (("index_keys",) if layer.index_keys is not None else ())
        padded = {name: jnp.pad(getattr(layer, name), pad) for name in slots}
        grown.append(layer._replace(positions=positions, **padded))
    return tuple(grown)


def _forget_after(cache: tuple, keep: int) -> tuple:
    return tuple(
        None if c is None else c._replace(positions=jnp.where(c.positions >= keep, -1, c.positions))
        for c in cache
    )


def params_dtype(params) -> jnp.dtype:
    """The dtype a model computes in: its embedding's (a KV cache is kept in it); the params may
    be in the decoding layout."""
    return params_dict(params)["tok_emb"]["embedding"].dtype


class ChatSession:
    """A multi-turn chat with a chat model: its history, kept in the model's chat template, and a
    Decoder whose cache holds the conversation so far."""

    def __init__(self, model, *, system: str | None = None, sampling: Sampling = CHAT_SAMPLING,
                 max_new_tokens: int = 512, seed: int = 0):  # fmt: skip
        if model.tokenizer.chat is None:
            raise ValueError(f"{model.name} has no chat template: it continues text, not chats")
        self.model, self.sampling, self.max_new_tokens = model, sampling, max_new_tokens
        self.decoder = Decoder(model.params, model.cfg)
        self.key, self.turn = jax.random.key(seed), 0
        self.system, self.messages = system, []

    def reset(self, system: str | None = None) -> None:
        """Forget the chat (and set a new system prompt, if given)."""
        self.system = system if system is not None else self.system
        self.messages = []

    def reply(self, text: str) -> Iterator[str]:
        """Add a user message and stream the model's reply as pieces of text; the reply joins the
        history when the stream ends, also when it is stopped early."""
        self.messages.append({"role": "user", "content": text})
        tokenizer, cfg = self.model.tokenizer, self.model.cfg
        ids = self._prompt_ids()
        shared = _common_prefix(self.decoder.ids, ids)
        self.decoder.rewind(shared)
        logits = self.decoder.feed(ids[shared:])
        room = min(self.max_new_tokens, cfg.context_length - len(ids))
        reply, shown = [], ""
        self.turn += 1
        key = jax.random.fold_in(self.key, self.turn)
        try:
            for token in self.decoder.tokens(logits, room, self.sampling, key, {tokenizer.eos_id}):
                if token == tokenizer.eos_id:
                    break
                reply.append(token)
                text_so_far = tokenizer.decode(reply)
                if not text_so_far.endswith("\ufffd"):  # a character not yet complete
                    yield text_so_far[len(shown) :]
                    shown = text_so_far
        finally:
            self.messages.append({"role": "assistant", "content": tokenizer.decode(reply)})

    def _prompt_ids(self) -> list[int]:
        """The chat's tokens with the start of a reply, dropping the oldest turns (the system
        prompt stays) until they leave room for a reply in the context."""
        tokenizer, limit = self.model.tokenizer, self.model.cfg.context_length // 2
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            ids = tokenizer.encode_chat(system + self.messages)
            if len(ids) <= limit or len(self.messages) <= 1:
                return ids[-limit:]
            self.messages = self.messages[2:]  # the oldest question and its answer


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
