"""Direct Preference Optimization (the book's bonus to chapter 7, after Rafailov et al. 2023).

Each instruction comes with a preferred ("chosen", polite) and a dispreferred ("rejected",
impolite) response. DPO raises the policy's log-probability of the chosen response relative to
the rejected one, both measured against a frozen copy of the starting model (the reference), with
no reward model and no sampling: a classification loss on pairs.
"""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gptflax import files, models
from gptflax.data import DataLoader, ragged, round_up
from gptflax.instruct import RESPONSE_HEADER, format_input

PREFERENCE_FILE = "instruction-data-with-preference.json"


def load_preference_data(path=None) -> list[dict]:
    """The book's 1,100 entries: "instruction", "input", "output", "chosen" and "rejected"."""
    with open(path or files.resolve(PREFERENCE_FILE), encoding="utf-8") as f:
        return json.load(f)


def encode_preferences(
    entries: list[dict], tokenizer, end_id: int | None = None
) -> tuple[list, list, np.ndarray]:
    """Token ids of prompt + "### Response:" + chosen, and of prompt + "### Response:" +
    rejected, for each entry (the book's PreferenceDataset), and where each response starts: at
    its "### Response:" header, after the prompt's blank line. With `end_id`, every response ends
    with that token (the book's has none), so the policy keeps learning where answers stop."""
    chosen, rejected, starts = [], [], []
    header, end = len(tokenizer.encode("###")), [] if end_id is None else [end_id]
    for e in entries:
        prompt = format_input(e)
        chosen.append(tokenizer.encode(prompt + RESPONSE_HEADER + e["chosen"], bos=True) + end)
        rejected.append(tokenizer.encode(prompt + RESPONSE_HEADER + e["rejected"], bos=True) + end)
        starts.append(len(tokenizer.encode(prompt + "\n\n###", bos=True)) - header)
    return chosen, rejected, np.array(starts, dtype=np.int32)


def collate_preferences(
    chosen,
    rejected,
    starts,
    reference,
    *,
    pad_token_id: int,
    pad_to_multiple: int = 1,
    allowed_max_length: int | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Rows of a batch -> (tokens, (mask, reference)).

    tokens (B, 2, T): each pair's chosen and rejected sequence, padded with pad_token_id to a
    common length rounded up to a multiple of pad_to_multiple (few shapes: few compilations), and
    cut to allowed_max_length (the model's context) when given, as the book's collate does.
    mask (B, 2, T): True on the response's tokens, from its header on; not on the prompt, not on
    the padding. reference (B, 2): the reference model's log-probabilities, carried along.
    """
    longest = max(len(s) for s in (*chosen, *rejected))
    width = round_up(longest, pad_to_multiple)
    if allowed_max_length is not None:
        width = min(width, allowed_max_length)
    tokens = np.full((len(chosen), 2, width), pad_token_id, dtype=np.int32)
    mask = np.zeros((len(chosen), 2, width), dtype=bool)
    for b, pair in enumerate(zip(chosen, rejected, strict=True)):
        for j, ids in enumerate(pair):
            ids = ids[:width]
            tokens[b, j, : len(ids)] = ids
            mask[b, j, starts[b] : len(ids)] = True
    return tokens, (mask, np.asarray(reference, dtype=np.float32))


def preference_loader(
    encoded: tuple[list, list, np.ndarray],
    reference: np.ndarray,
    batch_size: int = 8,
    *,
    pad_token_id: int,
    pad_to_multiple: int = 32,
    allowed_max_length: int | None = None,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 123,
) -> DataLoader:
    """Batches of `collate_preferences` from `encode_preferences`' output and the (N, 2)
    reference log-probabilities (zeros before they are known)."""
    chosen, rejected, starts = encoded
    collate = partial(
        collate_preferences,
        pad_token_id=pad_token_id,
        pad_to_multiple=pad_to_multiple,
        allowed_max_length=allowed_max_length,
    )
    return DataLoader(
        ragged(chosen), ragged(rejected), starts, np.asarray(reference, dtype=np.float32),
        batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, collate=collate,
    )  # fmt: skip


def sequence_logprobs(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean log-probability of each row's masked tokens, (B, T, V), (B, T), (B, T) -> (B,): the
    logits at position t score token t + 1 (the book's compute_logprobs)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # (B, T-1, V)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # (B, T-1)
    selected = mask[:, 1:]
    return (picked * selected).sum(-1) / jnp.maximum(selected.sum(-1), 1)


def pair_logprobs(params: dict, tokens: jax.Array, mask: jax.Array, cfg, key=None) -> jax.Array:
    """Mean response log-probabilities of each pair: (B, 2, T) -> (B, 2) [chosen, rejected]."""
    pairs, _, width = tokens.shape
    flat, flat_mask = tokens.reshape(pairs * 2, width), mask.reshape(pairs * 2, width)
    logits = models.forward(params, flat, cfg, key=key)  # (2B, T, V)
    return sequence_logprobs(logits, flat, flat_mask).reshape(pairs, 2)


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    beta: float = 0.1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The DPO loss of a batch of pairs, (B,) log-probabilities each -> (loss, chosen reward,
    rejected reward), batch means. A reward is beta * (policy - reference) log-probability (the
    paper's implicit reward; the book's notebook tracks it without beta); the loss is
    -log sigmoid of the chosen reward minus the rejected one, ln 2 while policy = reference."""
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    losses = -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards)
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def dpo_batch_loss(
    params: dict,
    tokens: jax.Array,
    extras: tuple,
    *,
    cfg,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    key=None,
) -> tuple[jax.Array, dict]:
    """The DPO loss of one batch of `preference_loader`, and its rewards as auxiliary metrics:
    the reward margin and the share of pairs the policy prefers the chosen response in.

    With `sft_weight`, the loss adds that times the chosen responses' negative log-likelihood
    per token (`chosen_nll`; RPO, Pang et al. 2024): DPO alone may lower both responses'
    likelihoods as long as the rejected one falls faster, until the policy no longer writes
    either; the added term keeps the chosen ones likely."""
    mask, reference = extras
    policy = pair_logprobs(params, tokens, mask, cfg, key=key)  # (B, 2)
    loss, chosen, rejected = dpo_loss(
        policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta
    )
    nll = -policy[:, 0].mean()
    preferred = (policy[:, 0] > policy[:, 1]).mean()
    return loss + sft_weight * nll, {
        "dpo_loss": loss, "chosen_nll": nll, "chosen_reward": chosen, "rejected_reward": rejected,
        "reward_margin": chosen - rejected, "chosen_preferred": preferred,
    }  # fmt: skip


def all_pair_logprobs(params: dict, loader: DataLoader, cfg) -> np.ndarray:
    """(N, 2) response log-probabilities of every pair of an unshuffled loader that keeps every
    example: the frozen reference model's are computed once this way, since they never change
    while the policy trains."""
    logprobs = jax.jit(pair_logprobs)
    batches = loader.batches(0)
    return np.concatenate([logprobs(params, tokens, mask, cfg) for tokens, (mask, _) in batches])
