"""Text generation: greedy (Book §4.7), then temperature, top-k and end-of-text (Book §5.3).

Two ways to decode, giving the same tokens:
- The book's loop runs the whole sequence through the model for every new token. Under `jax.jit`
  every new input shape compiles anew, so here the tokens sit in a window whose width is rounded
  up to a power of two (at most the context length): a run compiles only a few times. Causal
  attention makes the padding harmless: position t never sees positions after it.
- With a KV cache (`generate_cached`), the prompt runs once (prefill) and each new token runs
  alone, reading the keys and values of earlier positions from the cache. The whole loop is one
  jitted `lax.while_loop`, compiled once per prompt window width and cache size (both powers of
  two: the cache holds the positions a call can reach, not the whole context).

`generate` uses the cache whenever prompt and new tokens fit in the context; beyond it the book's
sliding window needs every position recomputed, so it falls back to the loop.

The cached loop reads the weights in the decoding layout (`gptflax.decoding`); each call lays the
params out so (a copy of every weight), unless they come from `decoding_params` already: do that
once when the same model decodes many times.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gptflax import models
from gptflax.decoding import check_trainable, decoding_layout

MIN_WINDOW = 8


def window_width(num_tokens: int, context_size: int) -> int:
    """The padded width for `num_tokens`: the next power of two >= 8, capped at context_size."""
    return min(max(MIN_WINDOW, 1 << (num_tokens - 1).bit_length()), context_size)


@jax.jit
def next_token_logits(params: dict, window: jax.Array, length: jax.Array, cfg) -> jax.Array:
    """Logits for the token after the first `length` tokens of each row: (B, W) -> (B, V)."""
    h = models.hidden(params, window, cfg)  # (B, W, D)
    last = jax.lax.dynamic_index_in_dim(h, length - 1, axis=1, keepdims=True)  # (B, 1, D)
    return models.head(params, last)[:, 0]  # only the last position goes through the head


def padded_window(idx: np.ndarray, context_size: int) -> tuple[np.ndarray, int]:
    """The last `context_size` tokens of idx (B, T), left-aligned in a zero-padded window."""
    idx_cond = idx[:, -context_size:]
    num_tokens = idx_cond.shape[1]
    window = np.zeros((idx.shape[0], window_width(num_tokens, context_size)), dtype=np.int32)
    window[:, :num_tokens] = idx_cond
    return window, num_tokens


def top_k_logits(logits: jax.Array, top_k: int) -> jax.Array:
    """Keep the k largest logits of each row, set the rest to -inf (Book §5.3.2): (..., V).

    A k of at least the vocabulary size keeps every logit."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    top_k = min(top_k, logits.shape[-1])
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]  # (..., 1)
    return jnp.where(logits < kth_largest, -jnp.inf, logits)


def top_p_logits(logits: jax.Array, top_p: float) -> jax.Array:
    """Keep the fewest likeliest logits of each row whose probabilities add up to top_p or more
    (nucleus sampling, Holtzman et al. 2020), set the rest to -inf: (..., V)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    ranked = jnp.sort(logits, axis=-1)[..., ::-1]  # (..., V), likeliest first
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # at least the likeliest one
    threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)  # (..., 1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """Make tokens already in the text (`seen`, booleans like logits) less likely: their positive
    logits divided by `penalty`, their negative ones multiplied (CTRL, Keskar et al. 2019)."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def sample_next_token(
    logits: jax.Array,
    key: jax.Array | None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """(B, V) logits -> (B,) ids: top-k and top-p filters, then greedy (temperature 0) or
    sampling (§5.3.3)."""
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    if top_p is not None:
        logits = top_p_logits(logits, top_p)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key (key=jax.random.key(...))")
    return jax.random.categorical(key, logits / temperature, axis=-1)


@partial(jax.jit, static_argnames=("temperature", "top_k"))
def _next_token(params, window, length, key, cfg, temperature, top_k):
    logits = next_token_logits(params, window, length, cfg)  # (B, V)
    return sample_next_token(logits, key, temperature, top_k)


def generate(
    params: dict,
    idx,
    max_new_tokens: int,
    cfg,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    key: jax.Array | None = None,
    use_cache: bool = True,
) -> np.ndarray:
    """Generate up to max_new_tokens after idx (B, T) (Book §5.3.3) -> (B, T + n).

    Token i is drawn with `jax.random.fold_in(key, i)`, so a fixed key reproduces the text. With
    `eos_id`, a row that emits it is finished: it gets eos_id from then on, and generation stops
    once every row has finished (the eos tokens stay in the output; `trim_at_eos` cuts them).
    The KV cache is used when T + max_new_tokens fits in the context and `use_cache` is on;
    beyond it, the book's loop slides a window of the last cfg.context_length tokens.
    """
    idx = np.asarray(idx, dtype=np.int32)
    context_size = cfg.context_length
    if use_cache and idx.shape[1] + max_new_tokens <= context_size:
        decoding = dict(temperature=temperature, top_k=top_k, eos_id=eos_id, key=key)
        return np.concatenate(
            [idx, generate_cached(params, idx, max_new_tokens, cfg, **decoding)], 1
        )
    check_trainable(params)  # the sliding window runs the whole model, as training does
    done = np.zeros(idx.shape[0], dtype=bool)
    for i in range(max_new_tokens):
        window, num_tokens = padded_window(idx, context_size)
        step_key = jax.random.fold_in(key, i) if key is not None else None
        next_ids = np.asarray(
            _next_token(params, jnp.asarray(window), num_tokens, step_key, cfg, temperature, top_k)
        ).astype(np.int32)
        if eos_id is not None:
            next_ids = np.where(done, eos_id, next_ids)
            done |= next_ids == eos_id
        idx = np.concatenate([idx, next_ids[:, None]], axis=1)
        if done.all():
            break
    return idx


@partial(jax.jit, static_argnames=("cache_len", "temperature", "top_k"))
def _decode_with_cache(
    params, window, lengths, max_new_tokens, eos_id, key, cfg, cache_len, temperature, top_k
):
    """Prefill the right-padded prompts window (B, W) of `lengths` (B,), then decode in a
    `lax.while_loop` with a cache of `cache_len` positions -> (B, cache_len) buffer of new ids
    and how many steps ran. The padding never enters the cache (its positions are -1).
    """
    batch, width = window.shape
    params = decoding_layout(params)  # once, before the loop
    cache = models.init_cache(cfg, batch, cache_len, params.params["tok_emb"]["embedding"].dtype)
    slots = jnp.arange(width)
    prompt_positions = jnp.where(slots < lengths[:, None], slots, -1)  # (B, W): -1 is padding
    h, cache = models.hidden_cached(params, window, cache, prompt_positions, cfg)
    last_logits = models.head(params, h[jnp.arange(batch), lengths - 1])  # (B, V): last only
    out = jnp.zeros((batch, cache_len), jnp.int32)

    def unfinished(state):
        i, _, _, _, done = state
        return (i < max_new_tokens) & ~done.all()

    def decode_step(state):
        i, cache, last_logits, out, done = state
        step_key = jax.random.fold_in(key, i) if key is not None else None
        next_ids = sample_next_token(last_logits, step_key, temperature, top_k).astype(jnp.int32)
        next_ids = jnp.where(done, eos_id, next_ids)  # (B,)
        done = done | (next_ids == eos_id)
        h, cache = models.hidden_cached(
            params, next_ids[:, None], cache, (lengths + i)[:, None], cfg
        )
        return i + 1, cache, models.head(params, h[:, 0]), out.at[:, i].set(next_ids), done

    start = (jnp.int32(0), cache, last_logits, out, jnp.zeros(batch, bool))
    steps, _, _, out, _ = jax.lax.while_loop(unfinished, decode_step, start)
    return out, steps


def generate_cached(
    params: dict,
    prompts,
    max_new_tokens: int,
    cfg,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    key: jax.Array | None = None,
) -> np.ndarray:
    """KV-cached decoding of a batch of prompts -> (B, n) new ids, n <= max_new_tokens.

    prompts: a (B, T) array, or a list of id lists of different lengths (decoded together; row b
    continues its own prompt). Options as in `generate`; greedy rows equal one-row `generate`.
    """
    rows = [np.asarray(p, dtype=np.int32).reshape(-1) for p in prompts]
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    if lengths.max() + max_new_tokens > cfg.context_length:
        raise ValueError(
            f"a prompt of {lengths.max()} tokens plus {max_new_tokens} new tokens exceeds the "
            f"context length of {cfg.context_length}: shorten the prompt, ask for fewer tokens, "
            "or use generate(..., use_cache=False), which slides the window"
        )
    window = np.zeros((len(rows), window_width(int(lengths.max()), cfg.context_length)), np.int32)
    for b, r in enumerate(rows):
        window[b, : len(r)] = r
    # The cache holds the positions this call can reach, in few distinct sizes (few compilations).
    cache_len = window_width(int(lengths.max()) + max_new_tokens, cfg.context_length)
    out, steps = _decode_with_cache(
        params, window, lengths, max_new_tokens, -1 if eos_id is None else eos_id, key,
        cfg, cache_len, temperature, top_k,
    )  # fmt: skip
    return np.asarray(out)[:, : int(steps)]


def trim_at_eos(ids, eos_id: int) -> list[int]:
    """The ids of one row up to, not including, its first eos_id."""
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def sample_text(
    params: dict,
    tokenizer,
    start_context: str,
    cfg,
    max_new_tokens: int = 50,
    **decoding,
) -> str:
    """Continue start_context, return the text on one line (the book's generate_and_print_sample).

    `decoding` takes `generate`'s options: temperature, top_k, eos_id, key.
    """
    encoded = np.array(
        [tokenizer.encode(start_context, allowed_special={"<|endoftext|>"}, bos=True)]
    )
    out = generate(params, encoded, max_new_tokens, cfg, **decoding)
    return tokenizer.decode(out[0].tolist()).replace("\n", " ")


def chat(params: dict, cfg, tokenizer, messages: list[dict], max_new_tokens: int = 256, **decoding):
    """The model's reply to a chat: messages [{"role": "user", "content": ...}, ...] go through
    the tokenizer's chat template, and the reply ends at its end-of-turn token (not included).
    `decoding` takes `generate`'s options: temperature, top_k, key."""
    ids = tokenizer.encode_chat(messages)
    out = generate(params, [ids], max_new_tokens, cfg, eos_id=tokenizer.eos_id, **decoding)
    return tokenizer.decode(trim_at_eos(out[0, len(ids) :], tokenizer.eos_id))
