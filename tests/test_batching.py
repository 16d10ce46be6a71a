"""Continuous batching: requests decoded together, each in its own row of one KV cache, get the
tokens each would get decoded alone; rows start, stop and are reused independently."""

import threading
from collections import Counter

import jax
import numpy as np
import pytest

from gptflax.batching import Batcher, Request, RowSampling, pick_rows
from gptflax.config import GEMMA3_TINY
from gptflax.models import init_params
from gptflax.streaming import Sampling, stream_tokens

pytestmark = pytest.mark.lab5

# A sliding-window layer (a ring of 4 slots) and a global one. The head is untied: a random
# model whose head is its embedding repeats its input token, which any decoder would get right.
CFG = GEMMA3_TINY.replace(n_layers=2, sliding_window_pattern=2, tie_embeddings=False)
SAMPLINGS = [Sampling(repetition_penalty=1.3), Sampling(0.9, top_k=20, top_p=0.9)]


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.key(0), CFG)


def alone(params, request: Request) -> list[int]:
    """The request's tokens decoded by itself (streaming.Decoder), up to a stop id."""
    tokens = stream_tokens(params, request.ids, request.max_new_tokens, CFG,
                           sampling=request.sampling, key=jax.random.key(request.seed))  # fmt: skip
    kept = []
    for token in tokens:
        if token in request.stop_ids:
            break
        kept.append(token)
    return kept


def run_together(batcher: Batcher, requests: list[Request]) -> list[list[int]]:
    """Submit every request at once, from a thread each; their tokens."""
    out = [None] * len(requests)

    def client(i):
        out[i] = list(batcher.stream(requests[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_requests_decoded_together_get_the_tokens_each_gets_alone(params):
    """Five ragged requests, three rows: rows are reused, the cache grows from 8 to 16 slots,
    each row samples with its own settings and key and stops at its own stop id."""
    rng = np.random.default_rng(1)
    requests = []
    for i in range(5):
        ids = rng.integers(0, CFG.vocab_size, int(rng.integers(1, 7))).tolist()
        free = alone(params, Request(ids, 10, SAMPLINGS[i % 2], seed=i))
        firsts = [t for j, t in enumerate(free) if j >= 1 + 2 * i and t not in free[:j]]
        stop = frozenset(firsts[:1])  # a token first seen later for later rows
        requests.append(Request(ids, 10, SAMPLINGS[i % 2], i, stop))
    expected = [alone(params, r) for r in requests]
    batcher = Batcher(params, CFG, slots=3, capacity=8)
    try:
        assert run_together(batcher, requests) == expected
    finally:
        batcher.close()
    stopped = sum(len(e) < 10 for e in expected)
    assert len({len(e) for e in expected}) >= 3 and stopped >= 3  # rows ended at different steps
    assert batcher.ended == Counter(stop=stopped, length=5 - stopped)
    assert batcher.decoder.capacity == 8  # grown to 16 while needed, then back


def test_after_warm_up_a_crowd_compiles_no_new_step(params):
    """warm_up compiles the step for 1, 2, 4 and 5 rows: five requests at once need no other."""
    from gptflax.batching import _step

    batcher = Batcher(params, CFG, slots=5, capacity=32)
    try:
        batcher.warm_up()
        compiled = _step._cache_size()
        requests = [Request([3 + i] * (1 + i), 4 + 3 * i, seed=i) for i in range(5)]
        assert run_together(batcher, requests) == [alone(params, r) for r in requests]
    finally:
        batcher.close()
    assert batcher.ended == Counter(length=5)
    assert _step._cache_size() == compiled


def test_a_cancelled_request_frees_its_row_for_the_next(params):
    batcher = Batcher(params, CFG, slots=3, capacity=8)
    got, jobs = [], []

    def cancel_after_a_token(item):  # the client is gone once it has a token (in the thread)
        got.append(item)
        if jobs:
            batcher.cancel(jobs[0])

    try:
        jobs.append(batcher.submit(Request([1, 2, 3], 50), cancel_after_a_token))
        request = Request([4, 5], 10, SAMPLINGS[1], seed=3)
        assert list(batcher.stream(request)) == alone(params, request)
    finally:
        batcher.close()
    assert got[-1] == "cancelled" and len(got) < 10 and batcher.active == 0
    assert batcher.ended == Counter(cancelled=1, length=1)


def test_each_row_picks_as_its_own_sampling_would():
    vocab, rows = 50, 5
    logits = jax.random.normal(jax.random.key(4), (rows, vocab))
    seen = jax.random.bernoulli(jax.random.key(5), 0.3, (rows, vocab))
    samplings = [Sampling(), Sampling(0.7, top_k=5), Sampling(1.3, top_p=0.6),
                 Sampling(1.0, 10, 0.8, 1.5), Sampling(0.5, top_k=vocab + 10)]  # fmt: skip
    seeds, drawn = np.arange(rows, dtype=np.uint32) + 7, np.arange(rows, dtype=np.int32)
    settings = RowSampling(
        np.array([s.temperature for s in samplings], np.float32),
        np.array([s.top_k or 0 for s in samplings], np.int32),
        np.array([s.top_p or 1 for s in samplings], np.float32),
        np.array([s.repetition_penalty for s in samplings], np.float32),
        seeds, drawn,
    )  # fmt: skip
    pick = jax.jit(pick_rows)
    keys = [
        jax.random.fold_in(jax.random.key(int(s)), int(n))
        for s, n in zip(seeds, drawn, strict=True)
    ]
    alone = [int(s.pick(logits[b], seen[b], keys[b])) for b, s in enumerate(samplings)]
    assert pick(logits, seen, settings).tolist() == alone
    draws = {tuple(pick(logits, seen, settings._replace(seed=seeds + k)).tolist())
             for k in range(8)}  # fmt: skip
    assert {d[0] for d in draws} == {alone[0]} and len(draws) > 1  # greedy needs no key


def test_requests_that_cannot_be_decoded_are_refused(params):
    batcher = Batcher(params, CFG, slots=3)
    try:
        with pytest.raises(ValueError, match="at most the context length, 64"):
            batcher.submit(Request(list(range(60)), 5), print)
        with pytest.raises(ValueError, match="top_p must be in"):
            batcher.submit(Request([1], 5, Sampling(1.0, top_p=0.0)), print)
        assert batcher.active == 0 and not batcher.waiting
    finally:
        batcher.close()
