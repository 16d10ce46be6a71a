"""Continuous batching: requests that arrive at different times decode together, each in its own
row of one KV cache (iteration-level scheduling, as Orca, vLLM and TGI serve models).

A `BatchDecoder` holds `rows` sequences in one cache (`models.init_cache(cfg, rows, length)`),
each row with its own positions. `start(row, ...)` prefills a prompt into a free row: only that
row runs through the model, the others are untouched. `step()` then advances every active row by
one token in one jitted call: each row feeds its last token at its own position and picks the
next with its own sampling settings and key, held as arrays so that rows sampling differently
share one compilation. A row gets the tokens `streaming.Decoder` picks for its request alone:
token i draws from fold_in(key(seed), i). The cache grows by doubling as the longest row does.

A `Batcher` serves requests with one: its thread puts each submitted request into a free row as
soon as there is one, steps all rows, hands each new token to its request, and frees the row when
the request ends (a stop token, max_new_tokens, or `cancel`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptflax import models
from gptflax.decoding import decoding_params
from gptflax.generate import penalize_repeats, window_width
from gptflax.streaming import Sampling, params_dtype, with_room


class RowSampling(NamedTuple):
    """Each row's `Sampling` and key as arrays (B,), which a jitted step reads as data."""

    temperature: jax.Array  # 0: greedy
    top_k: jax.Array  # 0: no top-k filter
    top_p: jax.Array  # 1: no top-p filter
    penalty: jax.Array  # the repetition penalty; 1: none
    seed: jax.Array  # uint32: the row's key is key(seed)
    drawn: jax.Array  # tokens picked so far: the next draws from fold_in(key(seed), drawn)


def pick_rows(logits: jax.Array, seen: jax.Array, rows: RowSampling) -> jax.Array:
    """(B, V) logits -> (B,) ids, each row picked as its own `Sampling.pick` would."""
    logits = penalize_repeats(logits, seen, rows.penalty[:, None])
    greedy = jnp.argmax(logits, axis=-1)  # the filters never drop the likeliest token
    sampling = jnp.any(rows.temperature > 0)  # else skip the filters and the random numbers
    return jax.lax.cond(sampling, _sampled, lambda *_: greedy, logits, rows, greedy)


def _filtered(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`generate.top_k_logits`, then `top_p_logits`, with each row's own k and p (B,): (B, V)."""
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V), likeliest first
    vocab = logits.shape[-1]
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = jnp.take_along_axis(ranked, k[:, None] - 1, axis=-1)  # (B, 1)
    ranked = jnp.where(ranked < kth, -jnp.inf, ranked)  # the top-k filtered logits, sorted
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p[:, None], axis=-1, keepdims=True)  # (B, 1)
    nucleus = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    threshold = jnp.where(top_p[:, None] < 1, nucleus, kth)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _sampled(logits: jax.Array, rows: RowSampling, greedy: jax.Array) -> jax.Array:
    """Each sampling row's draw from its filtered logits over its temperature; greedy rows keep
    greedy."""
    filters = (rows.temperature > 0) & ((rows.top_k > 0) | (rows.top_p < 1))
    filtered = partial(_filtered, top_k=rows.top_k, top_p=rows.top_p)
    logits = jax.lax.cond(jnp.any(filters), filtered, lambda x: x, logits)  # else skip the sort
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(rows.seed, rows.drawn)
    temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]  # (B, 1)
    draw = jax.vmap(lambda key, row: jax.random.categorical(key, row[None])[0])
    return jnp.where(rows.temperature > 0, draw(keys, logits / temperature), greedy)


def check_filters(sampling: Sampling) -> None:
    """A clear error for a top-k or top-p that no row can use."""
    if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k is not None and sampling.top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {sampling.top_k}")


class BatchDecoder:
    """KV-cached decoding of several sequences at once, a row each (see the module's docstring)."""

    def __init__(self, params: dict, cfg, rows: int = 8, capacity: int = 256):
        self.params, self.cfg = decoding_params(params), cfg  # laid out once for every step
        self.initial = self.capacity = min(capacity, cfg.context_length)
        self.dtype = params_dtype(params)
        self.cache = models.init_cache(cfg, rows, self.capacity, self.dtype)
        self.seen = jnp.zeros((rows, cfg.vocab_size), bool)  # each row's sampled tokens
        self.positions = np.full(rows, -1, np.int32)  # where each row's next token goes; -1: free
        self.last = np.zeros(rows, np.int32)  # each row's last token, fed at the next step
        self.sampling = RowSampling(
            temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32),
            top_p=np.ones(rows, np.float32), penalty=np.ones(rows, np.float32),
            seed=np.zeros(rows, np.uint32), drawn=np.zeros(rows, np.int32),
        )  # fmt: skip

    def start(self, row: int, ids: list[int], sampling: Sampling, seed: int) -> int:
        """Prefill `ids` into a free row (forgetting what it held): its first new token."""
        n, cfg = len(ids), self.cfg
        if not 0 < n < cfg.context_length:
            raise ValueError(f"a prompt needs 1 to {cfg.context_length - 1} tokens, not {n}")
        check_filters(sampling)
        self._make_room(n)
        settings = (sampling.temperature, sampling.top_k or 0, sampling.top_p or 1.0,
                    sampling.repetition_penalty, seed % 2**32, 0)  # fmt: skip
        for column, value in zip(self.sampling, settings, strict=True):
            column[row] = value
        width = window_width(n, cfg.context_length)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :n] = ids
        positions = np.where(np.arange(width) < n, np.arange(width), -1)[None]  # (1, W)
        one_row = RowSampling(*(column[row : row + 1] for column in self.sampling))
        first, self.cache, self.seen = _prefill(
            self.params, self.cache, self.seen, row, tokens, positions, n - 1, one_row, cfg
        )
        first = int(first)  # before the host arrays the call read change
        self.positions[row], self.last[row], self.sampling.drawn[row] = n, first, 1
        return first

    def step(self) -> np.ndarray:
        """Advance every active row by one token: each row's new token, (B,) (free rows: 0).

        Only the first n rows run, n the power of two that covers the last active row (rows are
        taken lowest first): one request alone costs a one-row step, not a `rows`-row one."""
        active = self.positions >= 0
        if self.positions.max() >= self.cfg.context_length:
            raise ValueError("a row has reached the end of the context: free it first")
        self._make_room(int(self.positions.max()) + 1)
        n = self._width(int(np.flatnonzero(active).max(initial=0)))
        ids = self._step_rows(n)
        self.last[:n] = np.where(active[:n], np.asarray(ids), 0)
        self.positions[active] += 1
        self.sampling.drawn[active] += 1
        return self.last

    def warm_up(self) -> None:
        """Compile the step for every width it takes (1, 2, 4, ... rows) while all rows are free,
        so that neither the first request nor the first crowd waits on the compiler."""
        if (self.positions >= 0).any():
            raise ValueError("warm_up runs before any row is started")
        for n in sorted({self._width(row) for row in range(len(self.positions))}):
            self._step_rows(n)

    def _width(self, last_row: int) -> int:
        """The rows a step runs when `last_row` is the last active one: a power of two, capped."""
        return min(1 << last_row.bit_length(), len(self.positions))

    def _step_rows(self, n: int) -> jax.Array:
        """One jitted step of the first n rows: their new tokens (n,)."""
        ids, self.cache, self.seen = _step(
            self.params, self.cache, self.seen, self.last[:n], self.positions[:n],
            RowSampling(*(column[:n] for column in self.sampling)), self.cfg,
        )  # fmt: skip
        return ids

    def free(self, row: int) -> None:
        """End a row's sequence; with every row free, the cache shrinks back to its first size."""
        self.positions[row] = -1
        if (self.positions < 0).all() and self.capacity > self.initial:
            self.capacity = self.initial
            self.cache = models.init_cache(self.cfg, len(self.positions), self.capacity, self.dtype)

    def _make_room(self, length: int) -> None:
        self.capacity, self.cache = with_room(self.cache, self.cfg, self.capacity, length)


@partial(jax.jit, static_argnames="cfg", donate_argnames=("cache", "seen"))
def _prefill(params, cache, seen, row, tokens, positions, last, sampling, cfg):
    """Run one prompt (1, W) at `positions` (1, W) into row `row` of the cache, whose earlier
    positions are forgotten; pick its first token: (id, cache, seen)."""
    one = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, row, 1), cache)
    one = tuple(
        None if c is None else c._replace(positions=jnp.full_like(c.positions, -1)) for c in one
    )
    h, one = models.hidden_cached(params, tokens, one, positions, cfg)  # (1, W, D)
    cache = jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, row, 0), cache, one)
    seen = seen.at[row].set(False)
    logits = models.head(params, h[:, last])  # (1, V)
    return pick_rows(logits, seen[row][None], sampling)[0], cache, seen


@partial(jax.jit, static_argnames="cfg", donate_argnames=("cache", "seen"))
def _step(params, cache, seen, tokens, positions, sampling, cfg):
    """Feed the first n rows' tokens (n,) at their positions (n,), -1 for a free row, and pick
    each one's next: (ids (n,), cache, seen). The other rows of the cache are not read."""
    n = tokens.shape[0]
    rows = jax.tree.map(lambda a: a[:n], cache)
    h, rows = models.hidden_cached(params, tokens[:, None], rows, positions[:, None], cfg)
    cache = jax.tree.map(lambda a, b: a.at[:n].set(b), cache, rows)
    seen = seen.at[jnp.arange(n), tokens].set(True)
    logits = models.head(params, h[:, 0])  # (n, V)
    return pick_rows(logits, seen[:n], sampling), cache, seen


# --- serving requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A prompt's ids, how many new tokens at most, how to sample (seed: the key is
    key(seed mod 2**32)), and the ids that end the answer (not given to the request)."""

    ids: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()


class Job:
    """A submitted request: `emit` receives each new id, then once the reason it ended: "stop"
    (a stop id), "length" (max_new_tokens), "cancelled" or "error"."""

    def __init__(self, request: Request, emit: Callable[[int | str], None]):
        self.request, self.emit = request, emit
        self.new_tokens, self.cancelled = 0, False


class Batcher:
    """Requests decoded together by a thread, `slots` at a time (see the module's docstring)."""

    def __init__(self, params: dict, cfg, *, slots: int = 8, capacity: int = 256):
        self.decoder, self.cfg = BatchDecoder(params, cfg, slots, capacity), cfg
        self.rows: list[Job | None] = [None] * slots
        self.waiting: deque[Job] = deque()
        self.ended = Counter()  # how many requests ended, by reason
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gptflax-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: Request, emit: Callable[[int | str], None]) -> Job:
        """Queue a request; the decoding thread calls `emit` with its tokens (see `Job`)."""
        n, room = len(request.ids), self.cfg.context_length
        if n + request.max_new_tokens > room or n < 1 or request.max_new_tokens < 1:
            raise ValueError(
                f"a prompt of {n} tokens and {request.max_new_tokens} new tokens: each needs at "
                f"least 1, together at most the context length, {room}"
            )
        check_filters(request.sampling)
        job = Job(request, emit)
        with self._wake:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self.waiting.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """End a request early (its row is freed before the next step); ended ones stay so."""
        job.cancelled = True

    def stream(self, request: Request) -> Iterator[int]:
        """The request's new ids as they are decoded (blocking); closing it cancels the request."""
        tokens = queue.SimpleQueue()
        job = self.submit(request, tokens.put)
        try:
            while isinstance(item := tokens.get(), int):
                yield item
        finally:
            self.cancel(job)

    def warm_up(self) -> None:
        """Compile the decoding steps now rather than at the first requests (call before any)."""
        self.decoder.warm_up()

    def close(self) -> None:
        """Stop the thread; requests under way end as "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    @property
    def active(self) -> int:
        return sum(job is not None for job in self.rows)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self.waiting or self.active)
                if self._closed:
                    break
            try:
                self._admit()
                self._end_cancelled()
                if self.active:
                    for row, token in enumerate(self.decoder.step()):
                        if self.rows[row] is not None:
                            self._deliver(row, int(token))
            except Exception:
                logging.getLogger(__name__).exception("decoding failed; its requests end")
                for row, job in enumerate(self.rows):
                    if job is not None:
                        self._end(row, "error")
        for row, job in enumerate(self.rows):
            if job is not None:
                self._end(row, "cancelled")
        for job in self.waiting:
            job.emit("cancelled")

    def _admit(self) -> None:
        """Prefill waiting requests into the free rows, oldest first."""
        for row in range(len(self.rows)):
            if self.rows[row] is not None:
                continue
            with self._wake:
                job = self.waiting.popleft() if self.waiting else None
            if job is None:
                return
            self.rows[row] = job
            if job.cancelled:
                self._end(row, "cancelled")
                continue
            r = job.request
            self._deliver(row, self.decoder.start(row, r.ids, r.sampling, r.seed))

    def _end_cancelled(self) -> None:
        for row, job in enumerate(self.rows):
            if job is not None and job.cancelled:
                self._end(row, "cancelled")

    def _deliver(self, row: int, token: int) -> None:
        """Hand a row's new token to its request, or end the request."""
        job = self.rows[row]
        if token in job.request.stop_ids:
            self._end(row, "stop")
            return
        job.emit(token)
        job.new_tokens += 1
        if job.new_tokens == job.request.max_new_tokens:
            self._end(row, "length")

    def _end(self, row: int, reason: str) -> None:
        job, self.rows[row] = self.rows[row], None
        self.decoder.free(row)
        self.ended[reason] += 1
        job.emit(reason)
