"""DPO (the book's bonus to ch. 7): preference data, masks, the loss, and training a policy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import dpo, models
from gptflax.config import LLAMA_TINY, TINY
from gptflax.instruct import split_instruction_data
from gptflax.models import family
from gptflax.tokenizer import EOT_ID, gpt2_tokenizer
from gptflax.training import fit, init_train_state, make_optimizer

pytestmark = pytest.mark.labdpo


@pytest.fixture(scope="module")
def data():
    return dpo.load_preference_data()


def test_the_books_preference_data_and_split(data):
    assert len(data) == 1_100
    assert [len(part) for part in split_instruction_data(data)] == [935, 55, 110]
    assert data[50]["chosen"] == "The correct spelling is 'Occasion.'"
    assert data[50]["rejected"] == "The correct spelling is obviously 'Occasion.'"


def test_masks_cover_the_response_only(data):
    tok = gpt2_tokenizer()
    chosen, rejected, starts = dpo.encode_preferences(data[:2], tok)
    # the book's first example: 50 prompt tokens (with the blank line), 24 response tokens
    assert (starts[0], len(chosen[0])) == (50, 74)
    assert chosen[0][:4] == [21106, 318, 281, 12064] and chosen[0][48:51] == [198, 198, 21017]
    loader = dpo.preference_loader((chosen, rejected, starts), np.zeros((2, 2)), 2,
                                   pad_token_id=EOT_ID)  # fmt: skip
    tokens, (mask, _) = next(iter(loader.batches(0)))
    assert tokens.shape == mask.shape == (2, 2, 96)  # the longest, 81 tokens, rounded up to 32s
    for b, entry in enumerate(data[:2]):
        for j, name in enumerate(("chosen", "rejected")):
            response = tok.decode(tokens[b, j][mask[b, j]].tolist())
            assert response == f"### Response:\n{entry[name]}"
            assert (tokens[b, j][len((chosen, rejected)[j][b]) :] == EOT_ID).all()


def test_an_end_token_closes_every_response_and_counts_in_its_mask(data):
    tok = gpt2_tokenizer()
    plain = dpo.encode_preferences(data[:2], tok)
    ended = dpo.encode_preferences(data[:2], tok, end_id=EOT_ID)
    for j in (0, 1):  # chosen, rejected
        assert all(e == p + [EOT_ID] for e, p in zip(ended[j], plain[j], strict=True))
    np.testing.assert_array_equal(ended[2], plain[2])  # the responses start where they did
    loader = dpo.preference_loader(ended, np.zeros((2, 2)), 2, pad_token_id=EOT_ID)
    tokens, (mask, _) = next(iter(loader.batches(0)))
    assert tok.decode(tokens[0, 1][mask[0, 1]].tolist()).endswith(
        data[0]["rejected"] + "<|endoftext|>"
    )


def test_pairs_longer_than_the_context_are_cut_to_it(data):
    encoded = dpo.encode_preferences(data[:2], gpt2_tokenizer())
    loader = dpo.preference_loader(encoded, np.zeros((2, 2)), 2, pad_token_id=EOT_ID,
                                   allowed_max_length=60)  # fmt: skip
    tokens, (mask, _) = next(iter(loader.batches(0)))
    assert tokens.shape == (2, 2, 60)
    assert (tokens[0, 0] == encoded[0][0][:60]).all()  # the first 60, not the padding
    assert mask[0, 0].sum() == 60 - encoded[2][0]  # the response's first tokens only


def test_dpo_loss_equals_an_independent_computation():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-2, 1, 16) for _ in range(4))
    loss, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    margin = 0.1 * ((pc - rc) - (pr - rr))
    expected = np.mean(np.logaddexp(0.0, -margin))  # -log sigmoid(m) = log(1 + e^-m)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(chosen - rejected, margin.mean(), rtol=1e-5, atol=1e-7)
    same = dpo.dpo_loss(pc, pr, pc, pr, beta=0.1)  # a policy equal to its reference
    assert float(same[0]) == pytest.approx(math.log(2)) and float(same[1] - same[2]) == 0.0


def test_sequence_logprobs_gives_the_books_gather_example():
    logits = jnp.array([[[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [0.0, 0.0, 0.0]]])  # (1, 3, 3)
    tokens = jnp.array([[1, 0, 2]])  # position t scores token t + 1: targets 0 and 2
    mask = jnp.array([[False, True, True]])
    assert -float(dpo.sequence_logprobs(logits, tokens, mask)[0]) == pytest.approx(1.4185, abs=1e-4)


def test_sequence_logprobs_is_the_masked_mean_of_each_tokens_logprob():
    logits = jax.random.normal(jax.random.key(0), (3, 7, 11))
    tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, 11)
    mask = jax.random.bernoulli(jax.random.key(2), 0.6, (3, 7)).at[:, 1].set(True)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    for b in range(3):
        picked = [logp[b, t - 1, int(tokens[b, t])] for t in range(1, 7) if mask[b, t]]
        got = float(dpo.sequence_logprobs(logits, tokens, mask)[b])
        assert got == pytest.approx(np.mean(picked), rel=1e-5)


def test_training_raises_the_margin_against_a_frozen_reference(data):
    cfg = TINY.replace(context_length=128)
    encoded = dpo.encode_preferences(data[:8], gpt2_tokenizer())
    params = models.init_params(jax.random.key(0), cfg)
    options = dict(batch_size=4, pad_token_id=EOT_ID)
    reference = dpo.all_pair_logprobs(params, dpo.preference_loader(encoded, np.zeros((8, 2)),
                                                                     **options), cfg)  # fmt: skip
    assert reference.shape == (8, 2) and np.all(reference < 0)
    evaluation = dpo.preference_loader(encoded, reference, **options)
    step0 = dpo.dpo_batch_loss(params, *next(iter(evaluation.batches(0))), cfg=cfg)[0]
    assert float(step0) == pytest.approx(math.log(2), abs=1e-6)  # the reference is the start
    loader = dpo.preference_loader(encoded, reference, **options, shuffle=True)
    tx = make_optimizer(1e-2, weight_decay=0.01)
    loss = jax.tree_util.Partial(dpo.dpo_batch_loss, cfg=cfg, beta=0.1)
    _, history = fit(init_train_state(params, tx), loader, evaluation, cfg, tx, num_epochs=8,
                     key=jax.random.key(1), loss=loss, has_aux=True, eval_freq=5)  # fmt: skip
    first, last = history.val_metrics[0], history.val_metrics[-1]
    assert history.val_losses[-1] < math.log(2) - 0.1 and last["reward_margin"] > 0.3
    assert last["reward_margin"] > first["reward_margin"] and last["chosen_preferred"] == 1.0


def test_the_loss_works_for_the_llama_family_too():
    cfg = LLAMA_TINY
    params = family(cfg).init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, 2, 16), 0, cfg.vocab_size)
    mask = jnp.zeros((3, 2, 16), bool).at[:, :, 8:].set(True)
    reference = jax.jit(dpo.pair_logprobs)(params, tokens, mask, cfg)  # (3, 2)
    loss_and_grad = jax.value_and_grad(dpo.dpo_batch_loss, has_aux=True)
    (loss, aux), grads = loss_and_grad(params, tokens, (mask, reference), cfg=cfg)
    # equal up to float32 rounding (the reference ran compiled, the policy not)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)
    assert abs(float(aux["reward_margin"])) < 1e-5
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # RPO: the chosen responses' negative log-likelihood per token, weighted, joins the loss
    with_sft, aux = dpo.dpo_batch_loss(params, tokens, (mask, reference), cfg=cfg, sft_weight=0.5)
    assert float(aux["chosen_nll"]) == pytest.approx(-float(reference[:, 0].mean()), rel=1e-5)
    assert float(with_sft) == pytest.approx(float(loss) + 0.5 * float(aux["chosen_nll"]), rel=1e-5)
    assert float(aux["dpo_loss"]) == pytest.approx(float(loss), rel=1e-6)
