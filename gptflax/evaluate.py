"""Benchmarks: multiple-choice tasks scored by the log-likelihood of each choice, as
lm-evaluation-harness scores them, and generative ones by their answers (`gptflax.benchmarks`
gives the items).

    results = evaluate(load_model("smollm2-135m-instruct"), "hellaswag", limit=500)
    results.acc, results.acc_norm, results.items_per_s

An item's choices share its context, so the context runs through the model once. Packed
(`score_packed`): each item is laid out as its context followed by each of its continuations at
the positions after the context, several items to a row, and a mask lets every token see its own
item's context and its own continuation only; the rows run through one plain forward, and only
the positions that predict a continuation token go through the output head. Models whose
attention takes no mask (DeltaNet, sparse, latent or shared-KV layers) go through the KV cache
instead (`score_cached`): the context's tokens but the last are prefilled into a cache, which is
repeated for each choice; each choice runs as [last context token, continuation...] at the
positions after it. Lengths are padded to buckets, so the jitted steps compile a few shapes.

- acc: the choice with the largest summed log-probability of its continuation's tokens.
- acc_norm: the same divided by the continuation's length in characters (the harness's acc_norm).
`score_uncached` scores the same items by the plain forward of context + continuation, choice by
choice: the check that the packed and cached paths are right.

Generative tasks are decoded greedily, a batch of prompts at a time, by the batched KV-cached
decoder (`generate.generate_cached`), and the answer cut at the task's stop texts is checked
(`gptflax.answers`): GSM8K's final number exactly, MATH-500's last box by SymPy equivalence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptflax import benchmarks, models
from gptflax.answers import extract_final_candidate, grade_answer, gsm8k_answer
from gptflax.benchmarks import Choice, Problem
from gptflax.decoding import decoding_params
from gptflax.generate import generate_cached, trim_at_eos
from gptflax.streaming import params_dtype

BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)  # padded lengths
# A packed row's tokens: first-fit fills 98.6% of them with HellaSwag's items (168 on average).
ROW_TOKENS = 512


class Encoded(NamedTuple):
    """An item's token ids: its context's, and each choice's continuation's."""

    context: list[int]
    continuations: list[list[int]]


class Scores(NamedTuple):
    """Per item: the summed log-probability of each choice's continuation, and whether greedy
    decoding would produce that continuation (lists, one value per choice)."""

    loglik: list[np.ndarray]
    greedy: list[np.ndarray]


# Generative tasks: where an answer ends, and how many tokens it may have by default.
STOP_TEXTS = {"gsm8k": ("Question:", "\n\n"), "math500": ()}
MAX_NEW_TOKENS = {"gsm8k": 256, "math500": 512}


class Results(NamedTuple):
    """A task's scores: accuracies in [0, 1] (acc_norm None for a generative task), items
    scored, wall time, and the tokens that ran through the model (multiple choice: contexts once,
    continuations once per choice; generative: prompts and answers; padding not counted)."""

    task: str
    acc: float
    acc_norm: float | None
    items: int
    seconds: float
    tokens: int

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds


def encode_item(tokenizer, item: Choice) -> Encoded:
    """The harness's encoding of (context, continuation) pairs: trailing spaces of the context
    move to the continuations; each continuation is what the tokens of context + continuation
    add after the context's tokens. A beginning-of-text token leads when the model adds one."""
    context = item.context.rstrip()
    moved = item.context[len(context) :]
    ids = tokenizer.encode(context, bos=True)
    return Encoded(ids, [tokenizer.encode(context + moved + c, bos=True)[len(ids) :]
                         for c in item.choices])  # fmt: skip


def padded(length: int) -> int:
    """The smallest of BUCKETS that holds `length` (beyond them, a multiple of 128): from 32 on a
    padded length wastes at most a fifth, and a task compiles a few shapes."""
    return next((b for b in BUCKETS if b >= length), -(-length // 128) * 128)


def lengths_fit(e: Encoded, context_length: int) -> Encoded:
    """The item with its context's first tokens dropped so that context + the longest
    continuation fit in the model's context (as the harness truncates)."""
    room = context_length - max(len(c) for c in e.continuations)
    if room < 1:
        raise ValueError(f"a continuation of {context_length - room} tokens fills the context")
    return Encoded(e.context[-room:], e.continuations)


def context_arrays(encoded: list[Encoded], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Contexts but their last token, padded into `rows` rows (missing rows repeat the last):
    prefixes (B, Tc) and their lengths (B,)."""
    encoded = encoded + [encoded[-1]] * (rows - len(encoded))
    prefix_lengths = np.array([len(e.context) - 1 for e in encoded], np.int32)
    prefixes = np.zeros((rows, padded(prefix_lengths.max())), np.int32)
    for b, e in enumerate(encoded):
        prefixes[b, : prefix_lengths[b]] = e.context[:-1]
    return prefixes, prefix_lengths


def choice_arrays(choices: list[tuple[int, list[int], list[int]]], rows: int) -> tuple:
    """Choices as (cache row, context, continuation), padded into `rows` rows (missing rows
    repeat the last): cache rows (R,), prefix lengths (R,), [last context token,
    continuation...] (R, S) and their lengths (R,)."""
    choices = choices + [choices[-1]] * (rows - len(choices))
    tokens = np.zeros((rows, padded(max(len(c) + 1 for _, _, c in choices))), np.int32)
    for r, (_, context, continuation) in enumerate(choices):
        tokens[r, : len(continuation) + 1] = [context[-1], *continuation]
    cache_rows = np.array([row for row, _, _ in choices], np.int32)
    prefix_lengths = np.array([len(context) - 1 for _, context, _ in choices], np.int32)
    lengths = np.array([len(c) + 1 for _, _, c in choices], np.int32)
    return cache_rows, prefix_lengths, tokens, lengths


def token_logprobs(params: dict, h: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Hidden states (N, S, D) and the tokens they predict (N, S) -> each target's
    log-probability (N, S) and whether it is the likeliest token (N, S)."""
    logits = models.head(params, h).astype(jnp.float32)  # (N, S, V)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprob = target - jax.nn.logsumexp(logits, axis=-1)
    return logprob, target >= logits.max(axis=-1)


@partial(jax.jit, static_argnames=("cfg", "length"))
def prefill_contexts(params, prefixes, prefix_lengths, cfg, length):
    """Run the contexts' prefixes (B, Tc), `prefix_lengths` (B,) real tokens each, into a new KV
    cache of `length` positions, which is returned."""
    cache = models.init_cache(cfg, prefixes.shape[0], length, params_dtype(params))
    slots = jnp.arange(prefixes.shape[1])
    positions = jnp.where(slots < prefix_lengths[:, None], slots, -1)  # (B, Tc): -1 is padding
    return models.hidden_cached(params, prefixes, cache, positions, cfg)[1]


@partial(jax.jit, static_argnames="cfg")
def score_choices(params, cache, cache_rows, prefix_lengths, tokens, lengths, cfg):
    """Choice rows (R, S), `lengths` (R,) real tokens each, each over a copy of its item's row
    of the prefilled cache (`cache_rows` (R,)) -> summed log-probabilities of the continuations
    (R,) and whether each continuation is all greedy tokens (R,)."""
    cache = jax.tree.map(lambda a: a[cache_rows], cache)  # (R, ...)
    steps = jnp.arange(tokens.shape[1])
    positions = jnp.where(steps < lengths[:, None], prefix_lengths[:, None] + steps, -1)  # (R, S)
    h, _ = models.hidden_cached(params, tokens, cache, positions, cfg)
    logprob, greedy = token_logprobs(params, h[:, :-1], tokens[:, 1:])
    counted = steps[1:] < lengths[:, None]  # (R, S - 1): the continuation's tokens
    return jnp.where(counted, logprob, 0.0).sum(-1), jnp.where(counted, greedy, True).all(-1)


@partial(jax.jit, static_argnames="cfg")
def _score_rows(params, tokens, context_lengths, lengths, cfg):
    """The plain forward of rows (N, T) = context + continuation: summed log-probabilities of
    the continuation tokens (N,) and all-greedy flags (N,)."""
    logprob, greedy = token_logprobs(params, models.hidden(params, tokens, cfg)[:, :-1],
                                     tokens[:, 1:])  # fmt: skip
    steps = jnp.arange(tokens.shape[1] - 1)
    counted = (steps >= context_lengths[:, None] - 1) & (steps < lengths[:, None] - 1)
    return jnp.where(counted, logprob, 0.0).sum(-1), jnp.where(counted, greedy, True).all(-1)


def score_uncached(params: dict, cfg, encoded: list[Encoded]) -> Scores:
    """Each choice of each item through the plain `forward` of context + continuation, one row
    per choice (the reference for `score`; no cache, the context recomputed per choice)."""
    loglik, greedy = [], []
    for e in encoded:
        rows = [e.context + c for c in e.continuations]
        tokens = np.zeros((len(rows), padded(max(map(len, rows)))), np.int32)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row
        context_lengths = np.full(len(rows), len(e.context), np.int32)
        ll, g = _score_rows(params, tokens, context_lengths, np.array([len(r) for r in rows]), cfg)
        loglik.append(np.asarray(ll))
        greedy.append(np.asarray(g))
    return Scores(loglik, greedy)


def packs(cfg) -> bool:
    """Whether `score` packs items into rows: where the model's attention takes a mask."""
    return getattr(models.family(cfg), "plain_attention", lambda cfg: True)(cfg)


def packed_rows(batch_size: int) -> int:
    """How many packed rows `score` puts in one call for a batch size (a row holds several)."""
    return max(1, batch_size // 8)


def score(
    params: dict,
    cfg,
    encoded: list[Encoded],
    *,
    batch_size: int = 8,
    progress: Callable | None = None,
) -> Scores:
    """Every item's choices scored: in packed rows (`score_packed`, `packed_rows` rows of
    ROW_TOKENS at a time) where the model's attention takes a mask, else through the KV cache
    (`score_cached`, batch_size rows at a time). `progress(n)` is told of every n items done.

    HellaSwag, SmolLM2, 120 items in turn in one process: packed 35.2-36.2 s (one row of 512 a
    call; two 35.7-38.2, four 40.6), through the cache 42.2-44.2 s."""
    if packs(cfg):
        return score_packed(params, cfg, encoded, rows=packed_rows(batch_size), progress=progress)
    return score_cached(params, cfg, encoded, batch_size=batch_size, progress=progress)


def score_cached(
    params: dict,
    cfg,
    encoded: list[Encoded],
    *,
    batch_size: int = 8,
    progress: Callable | None = None,
) -> Scores:
    """Every item's choices scored through the KV cache. Items go in groups of 2 * batch_size,
    longest contexts first: a group's contexts are prefilled `batch_size` at a time into one KV
    cache (`prefill_contexts`), then all its choices, sorted by length across the group, are
    scored `batch_size` rows at a time, each row over its item's cache (`score_choices`): rows of
    similar lengths pad little. `progress(n)` is told after each group how many items it held.
    One cache length serves the whole call, so each step compiles once per length bucket.

    The params may be in the decoding layout (`decoding_params`): stacked, every call copies each
    layer's weights out of the stack (HellaSwag, SmolLM2: 1.10x faster laid out)."""
    cache_len = padded(max(len(e.context) for e in encoded)) + padded(
        max(len(c) + 1 for e in encoded for c in e.continuations)
    )
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].context), reverse=True)
    loglik = [np.zeros(len(e.continuations), np.float32) for e in encoded]
    greedy = [np.zeros(len(e.continuations), bool) for e in encoded]
    for start in range(0, len(order), 2 * batch_size):
        group = order[start : start + 2 * batch_size]
        cache = _group_cache(params, cfg, [encoded[i] for i in group], batch_size, cache_len)
        choices = [(row, i, k) for row, i in enumerate(group)
                   for k in range(len(encoded[i].continuations))]  # fmt: skip
        choices.sort(key=lambda c: len(encoded[c[1]].continuations[c[2]]), reverse=True)
        for first in range(0, len(choices), batch_size):
            chunk = choices[first : first + batch_size]
            arrays = choice_arrays([(row, encoded[i].context, encoded[i].continuations[k])
                                    for row, i, k in chunk], batch_size)  # fmt: skip
            ll, g = (np.asarray(x) for x in score_choices(params, cache, *arrays, cfg))
            for r, (_, i, k) in enumerate(chunk):
                loglik[i][k], greedy[i][k] = ll[r], g[r]
        if progress is not None:
            progress(len(group))
    return Scores(loglik, greedy)


def _group_cache(params, cfg, encoded: list[Encoded], batch_size: int, cache_len: int) -> tuple:
    """The items' contexts prefilled `batch_size` at a time, their caches joined: row r of the
    result is item r's."""
    caches = [
        prefill_contexts(
            params, *context_arrays(encoded[first : first + batch_size], batch_size), cfg, cache_len
        )  # fmt: skip
        for first in range(0, len(encoded), batch_size)
    ]
    return caches[0] if len(caches) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *caches)


def item_tokens(e: Encoded) -> int:
    """The tokens an item takes in a packed row: its context once, then every continuation."""
    return len(e.context) + sum(map(len, e.continuations))


def pack(encoded: list[Encoded], length: int) -> list[list[int]]:
    """The items' indices in rows of `length` tokens, largest items first, each into the first
    row it fits (first-fit decreasing)."""
    rows, room = [], []
    for i in sorted(range(len(encoded)), key=lambda i: item_tokens(encoded[i]), reverse=True):
        need = item_tokens(encoded[i])
        r = next((r for r, free in enumerate(room) if free >= need), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(length)
        rows[r].append(i)
        room[r] -= need
    return rows


def packed_arrays(encoded: list[Encoded], rows: list[list[int]], length: int, n_rows: int):
    """Rows of packed items (missing rows all padding): tokens, positions (-1: padding), the
    item each token belongs to (its place in the row, -1: padding) and its branch (0: the
    context, k + 1: continuation k), each (R, L); then per continuation token, the index of the
    token that predicts it (the context's last for a first token) and the token, (R, P), and
    whose it is: item index and choice (R, P), -1 for padding."""
    grid = np.zeros((4, n_rows, length), np.int32)  # tokens, positions, items, branches
    grid[1:3] = -1
    predictions = [[] for _ in range(n_rows)]  # (predicting index, token, item, choice)
    for r, row in enumerate(rows):
        at = 0
        for j, i in enumerate(row):
            e = encoded[i]
            n = len(e.context)
            for layer, values in enumerate((e.context, np.arange(n), j, 0)):
                grid[layer, r, at : at + n] = values
            last, at = at + n - 1, at + n
            for k, continuation in enumerate(e.continuations):
                m = len(continuation)
                for layer, values in enumerate((continuation, n + np.arange(m), j, k + 1)):
                    grid[layer, r, at : at + m] = values
                predicting = [last, *range(at, at + m - 1)]  # each token's predictor
                predictions[r] += [(p, continuation[q], i, k) for q, p in enumerate(predicting)]
                at += m
    targets = np.zeros((4, n_rows, padded(max(map(len, predictions)))), np.int32)
    targets[2:] = -1  # predicting index, token, item, choice
    for r, p in enumerate(predictions):
        if p:
            targets[:, r, : len(p)] = np.array(p, np.int32).T
    return (*grid, *targets)


@partial(jax.jit, static_argnames="cfg")
def score_packed_rows(params, tokens, positions, segments, branches, predicting, targets, cfg):
    """Packed rows (R, L) through the plain forward, each token seeing its own item's context and
    its own continuation -> each target's log-probability (R, P) and whether it is the likeliest
    token (R, P), from the hidden states at `predicting` (R, P)."""
    same_item = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
    own_branch = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    h = models.hidden_packed(params, tokens, positions, same_item & own_branch, cfg)  # (R, L, D)
    h = jnp.take_along_axis(h, predicting[..., None], axis=1)  # (R, P, D)
    return token_logprobs(params, h, targets)


def packed_batches(encoded: list[Encoded], rows: int = 1) -> Iterator[tuple[list, tuple]]:
    """The items packed (`pack`) in rows of ROW_TOKENS (longer where an item needs more), `rows`
    at a time: each time the items' indices per row and their `packed_arrays`."""
    length = max(ROW_TOKENS, -(-max(map(item_tokens, encoded)) // 128) * 128)
    packed = pack(encoded, length)
    for first in range(0, len(packed), rows):
        chunk = packed[first : first + rows]
        yield chunk, packed_arrays(encoded, chunk, length, rows)


def score_packed(
    params: dict,
    cfg,
    encoded: list[Encoded],
    *,
    rows: int = 1,
    progress: Callable | None = None,
) -> Scores:
    """Every item's choices scored in packed rows, `rows` at a time (`packed_batches`,
    `score_packed_rows`): the FLOPs of every real token once, and only the predicting positions
    through the head. `progress(n)` is told of every n items done."""
    counts = np.cumsum([0] + [len(e.continuations) for e in encoded])  # item i's choices start
    loglik, greedy = np.zeros(counts[-1], np.float32), np.ones(counts[-1], bool)
    for chunk, (*inputs, items, choices) in packed_batches(encoded, rows):
        ll, g = (np.asarray(x) for x in score_packed_rows(params, *inputs, cfg))
        real = items >= 0
        at = counts[items[real]] + choices[real]
        np.add.at(loglik, at, ll[real])
        np.logical_and.at(greedy, at, g[real])
        if progress is not None:
            progress(sum(map(len, chunk)))
    split = lambda a: np.split(a, counts[1:-1])  # noqa: E731
    return Scores(split(loglik), split(greedy))


def accuracy(items: list[Choice], loglik: list[np.ndarray]) -> tuple[float, float]:
    """acc and acc_norm (log-likelihood per character of the continuation) over the items."""
    right = [int(np.argmax(ll)) == item.gold for item, ll in zip(items, loglik, strict=True)]
    per_char = [
        ll / np.array([len(c) for c in item.choices])
        for item, ll in zip(items, loglik, strict=True)
    ]
    right_norm = [int(np.argmax(x)) == item.gold for item, x in zip(items, per_char, strict=True)]
    return float(np.mean(right)), float(np.mean(right_norm))


def spread(items: list, limit: int | None) -> list:
    """`limit` of the items, evenly spaced from the first (all of them without a limit): a
    sample that covers the whole set (every MMLU subject, both of HellaSwag's sources), unlike
    the first `limit` items."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def evaluate(
    model,
    task: str,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: Callable | None = None,
    max_new_tokens: int | None = None,
) -> Results:
    """Score a loaded model (`sources.Model`) on a task, or on `limit` of its items spread
    evenly over it, `batch_size` rows at a time (a generative task's answers: up to
    `max_new_tokens`, else the task's MAX_NEW_TOKENS)."""
    items = spread(benchmarks.load_task(task), limit)
    if isinstance(items[0], Problem):
        n = max_new_tokens or MAX_NEW_TOKENS[task]
        return _solve(model, task, items, batch_size, progress, n)
    encoded = [lengths_fit(encode_item(model.tokenizer, it), model.cfg.context_length)
               for it in items]  # fmt: skip
    start = time.perf_counter()
    params = decoding_params(model.params)  # laid out once: no step slices its layers
    scores = score(params, model.cfg, encoded, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.context) + sum(map(len, e.continuations)) for e in encoded)
    return Results(task, *accuracy(items, scores.loglik), len(items), seconds, tokens)


def generate_answers(
    model, prompts: list[str], max_new_tokens: int, *, batch_size: int = 8, progress=None
) -> tuple[list[str], int]:
    """Greedy answers to prompts, `batch_size` decoded together through the KV cache, each up
    to its end token: (the answers' texts, the tokens the model ran)."""
    params, tokenizer = decoding_params(model.params), model.tokenizer  # laid out once
    answers, tokens = [], 0
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p, bos=True) for p in prompts[start : start + batch_size]]
        out = generate_cached(params, ids, max_new_tokens, model.cfg, eos_id=tokenizer.eos_id)
        rows = [trim_at_eos(row, tokenizer.eos_id) for row in out]
        answers += [tokenizer.decode(row) for row in rows]
        tokens += sum(map(len, ids)) + sum(map(len, rows))
        if progress is not None:
            progress(len(ids))
    return answers, tokens


def cut_at(text: str, stops: tuple[str, ...]) -> str:
    """The text up to the first of the stop texts."""
    return min((text[: text.index(s)] for s in stops if s in text), key=len, default=text)


def is_correct(task: str, answer: str, expected: str) -> bool:
    """GSM8K: the final number equals the reference; MATH-500: the last box is equivalent."""
    if task == "gsm8k":
        got = gsm8k_answer(answer)
        return got != "" and float(got) == float(expected.replace(",", ""))
    return grade_answer(extract_final_candidate(answer), expected)


def _solve(model, task, items: list[Problem], batch_size, progress, max_new_tokens) -> Results:
    start = time.perf_counter()
    answers, tokens = generate_answers(model, [it.prompt for it in items], max_new_tokens,
                                       batch_size=batch_size, progress=progress)  # fmt: skip
    seconds = time.perf_counter() - start
    right = [is_correct(task, cut_at(a, STOP_TEXTS[task]), it.answer)
             for a, it in zip(answers, items, strict=True)]  # fmt: skip
    return Results(task, float(np.mean(right)), None, len(items), seconds, tokens)
