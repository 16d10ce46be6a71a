"""Streaming decoding: one jitted step a token, the same tokens as the batch decoder; the cache
grows and rewinds; chat sessions keep their cache from turn to turn; the sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import sources
from gptflax.config import GEMMA3_TINY, LLAMA_TINY, TINY
from gptflax.generate import generate, penalize_repeats, top_p_logits
from gptflax.models import init_params
from gptflax.streaming import ChatSession, Decoder, Sampling, stream_tokens

pytestmark = pytest.mark.lab5


@pytest.mark.parametrize("cfg", [TINY.replace(vocab_size=97), LLAMA_TINY, GEMMA3_TINY])
def test_streamed_tokens_are_the_batch_decoders_as_the_cache_grows(cfg):
    params = init_params(jax.random.key(0), cfg)
    prompt = [int(t) for t in jax.random.randint(jax.random.key(1), (5,), 0, cfg.vocab_size)]
    decoder = Decoder(params, cfg, capacity=8)  # grows to 16, then 32 (Gemma's rings stay at 4)
    options = dict(temperature=1.0, top_k=20)
    streamed = list(
        decoder.tokens(decoder.feed(prompt), 20, Sampling(**options), jax.random.key(2))
    )
    batch = generate(params, [prompt], 20, cfg, key=jax.random.key(2), **options)[0, 5:]
    assert streamed == batch.tolist() and decoder.capacity == 32
    assert len(decoder.ids) == 5 + 19  # the last token is yielded, not fed


def test_rewinding_forgets_the_positions_after_the_kept_ones():
    cfg = GEMMA3_TINY  # sliding windows of 4: rings whose old slots must not be seen again
    params = init_params(jax.random.key(3), cfg)
    decoder = Decoder(params, cfg)
    decoder.feed(list(range(10, 30)))
    decoder.rewind(6)
    rewound = decoder.feed(list(range(40, 52)))
    fresh = Decoder(params, cfg)
    np.testing.assert_allclose(rewound, fresh.feed([*range(10, 16), *range(40, 52)]), atol=2e-5)


def test_a_step_stopped_after_it_took_the_cache_leaves_a_decoder_that_goes_on():
    """Ctrl-C can land after a step has taken the cache (donated) and before it gives the new one
    back: the decoder then builds its cache again from the tokens it kept."""
    cfg = LLAMA_TINY
    params = init_params(jax.random.key(5), cfg)
    decoder, fresh = Decoder(params, cfg), Decoder(params, cfg)
    decoder.feed(list(range(3, 15)))
    for leaf in jax.tree.leaves(decoder.cache):
        leaf.delete()  # what a donating call leaves when its result is lost
    np.testing.assert_allclose(
        decoder.feed([20, 21]), fresh.feed([*range(3, 15), 20, 21]), atol=2e-5
    )
    assert decoder.ids == [*range(3, 15), 20, 21]


def test_past_the_context_the_stream_slides_the_window():
    cfg = TINY.replace(vocab_size=97)
    params = init_params(jax.random.key(4), cfg)
    prompt = list(range(1, 25))  # 24 + 20 new tokens > the context of 32
    streamed = list(stream_tokens(params, prompt, 20, cfg))
    assert streamed == generate(params, [prompt], 20, cfg, use_cache=False)[0, 24:].tolist()


def test_a_chat_session_reads_its_history_from_the_cache():
    """Greedy: the second answer with the first turn in the cache is the answer of a fresh
    session given the whole conversation at once."""
    model = sources.load_model("tiny-llama")
    greedy = Sampling()
    session = ChatSession(model, sampling=greedy, max_new_tokens=12)
    first = "".join(session.reply("Hello there."))
    second = "".join(session.reply("And again?"))
    assert session.messages[1] == {"role": "assistant", "content": first}
    shared = len(session.decoder.ids)
    fresh = ChatSession(model, sampling=greedy, max_new_tokens=12)
    fresh.messages = session.messages[:3]
    fresh.messages.pop()  # replay: the history up to the second question
    assert "".join(fresh.reply("And again?")) == second
    assert shared > len(model.tokenizer.encode_chat(session.messages[:1]))  # reused, not refed


def test_top_p_keeps_the_nucleus_and_the_penalty_lowers_seen_tokens():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    kept = np.isfinite(np.asarray(top_p_logits(logits, 0.8)))
    assert kept.tolist() == [True, True, False, False]  # 0.5 + 0.3 reach 0.8
    assert np.isfinite(np.asarray(top_p_logits(logits, 0.1))).tolist() == [
        True,
        False,
        False,
        False,
    ]
    seen = jnp.array([True, False, True, False])
    penalized = penalize_repeats(jnp.array([2.0, 2.0, -1.0, -1.0]), seen, 2.0)
    assert penalized.tolist() == [1.0, 2.0, -2.0, -1.0]
    with pytest.raises(ValueError, match="temperature: must be a finite number"):
        Sampling(temperature=float("inf"))
