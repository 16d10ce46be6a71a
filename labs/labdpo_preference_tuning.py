# %% [markdown]
# # Lab DPO: preference tuning with Direct Preference Optimization (bonus to chapter 7)
#
# Chapter 7's model answers instructions. Here it learns a style: each of the 1,100 instructions
# comes with a polite ("chosen") and an impolite ("rejected") response, and Direct Preference
# Optimization (Rafailov et al., 2023) trains the model, the policy, to raise the probability of
# the first relative to the second, measured against a frozen copy of itself, the reference.
# There is no reward model and no sampling: a classification loss on pairs of fixed texts.
#
# Starting weights: lab 7's fine-tuned model (runs/lab7/model; GPT-2 355M there is the book's
# choice) when it exists, else SmolLM2-135M-Instruct, else a fresh model. GPTFLAX_QUICK=1: a fresh
# tiny GPT on 200 pairs with a larger step.

# %%
print("\n# 1) DPO in one formula")
# For a prompt x with chosen response y_w and rejected y_l, policy pi and reference pi_ref:
#   loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x))
#                               - (log pi(y_l|x) - log pi_ref(y_l|x))])
# beta * (log pi - log pi_ref) is the response's implicit reward; the loss pushes the chosen
# reward above the rejected one, and beta (0.1) sets how far the policy may drift from the start.
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from labkit import QUICK, run_dir, starting_model

from gptflax import checkpoint, dpo, sources
from gptflax.config import TINY, LlamaConfig
from gptflax.instruct import format_input, generate_responses, split_instruction_data
from gptflax.plots import plot_losses, plot_values
from gptflax.training import fit, init_train_state, make_optimizer

RUNS = run_dir("labdpo")  # runs/labdpo, or runs/quick/labdpo in quick mode
BETA = 0.1

# %%
print("\n# 2.1) The preference data: chapter 7's entries with a chosen and a rejected response")
data = dpo.load_preference_data()
print(f"{len(data):,} entries; entry 50:")
for key in ("instruction", "chosen", "rejected"):
    print(f"  {key}: {data[50][key]!r}")
print("\nits prompt, in chapter 7's format:\n" + format_input(data[50]))

# %%
print("\n# 2.2) The book's split, in file order")
train_data, val_data, test_data = split_instruction_data(data)
sizes = [len(d) for d in (train_data, val_data, test_data)]
print(f"train / val / test: {sizes}")
if QUICK:
    train_data = train_data[:200]

# %%
print("\n# 3) The model to align: the policy trains, the reference stays as it is")
# (Before the loaders: its tokenizer encodes the pairs, its context cuts them.)
# In JAX the reference needs no copy: params are immutable arrays, and training makes new ones.
lab7_model = os.path.abspath("runs/lab7/model")
if QUICK:
    start = starting_model((), fresh_cfg=TINY.replace(context_length=128), smollm2=False)
    cfg, reference_params, about = start.cfg, start.params, start.about
    tokenizer, tokenizer_name = start.tokenizer, start.tokenizer_name
elif checkpoint.latest_step(lab7_model) is not None:
    _, meta = checkpoint.read_meta(lab7_model)
    _, cfg, reference_params, tokenizer, tokenizer_name = sources.load_checkpoint_model(lab7_model)
    about = f"lab 7's fine-tuned model ({lab7_model}, from {meta.get('source', '?')})"
else:
    start = starting_model(())  # SmolLM2-135M-Instruct, or fresh weights without it
    cfg, reference_params, about = start.cfg, start.params, start.about
    tokenizer, tokenizer_name = start.tokenizer, start.tokenizer_name
print(f"starting point: {about}\n{cfg}")

# %%
print("\n# 2.3) Pairs as token ids, with masks on the responses")
# Each row of a batch holds a pair: (B, 2, T) tokens, chosen at [:, 0], rejected at [:, 1]. The
# mask is True from "### Response:" to the response's end: the prompt is the same in both and
# says nothing about the preference; the padding is not text. Widths are rounded up to 32s.
# Unlike the book, each response ends with the end token chapter 7 taught the model to stop with:
# without it (measured from SmolLM2, lr 1e-5) the policy matched the book's margins but stopped
# ending its answers ("I hope this response meets your requirements." over and over).
end_id = tokenizer.eos_id
encoded = [dpo.encode_preferences(d, tokenizer, end_id) for d in (train_data, val_data, test_data)]
collate = dict(pad_token_id=end_id, allowed_max_length=cfg.context_length)
first_tokens, (first_mask, _) = next(
    iter(dpo.preference_loader(encoded[0], np.zeros((len(train_data), 2)), **collate).batches(0))
)
masked_chosen = tokenizer.decode(first_tokens[0, 0][first_mask[0, 0]].tolist())
print(f"first batch: tokens {first_tokens.shape}; the first chosen text under its mask:")
print(repr(masked_chosen))

# %%
print("\n# 4) The DPO loss, from log-probabilities")
# A response's log-probability is the mean over its tokens of log softmax(logits)[next token]
# (the book's compute_logprobs). Its gather example: two targets, mean -1.4185.
toy_logits = jnp.array([[[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [0.0, 0.0, 0.0]]])  # (1, 3, V=3)
toy_mask = jnp.array([[False, True, True]])
toy_logp = float(dpo.sequence_logprobs(toy_logits, jnp.array([[1, 0, 2]]), toy_mask)[0])
print(f"gather example: mean log-probability {toy_logp:.4f}")
same = dpo.dpo_loss(*(jnp.array([-1.0, -2.0]),) * 4, beta=BETA)  # policy = reference
print(f"a policy equal to its reference: loss {float(same[0]):.4f} = ln 2, margin 0")

# %%
print("\n# 5.1) The reference's log-probabilities, computed once")
# They never change, so one pass over every pair replaces a reference forward pass in every
# training step and every evaluation batch (the book's loop runs both models each time).
in_order = [dpo.preference_loader(e, np.zeros((len(e[0]), 2)), **collate) for e in encoded]
t0 = time.perf_counter()
reference = [dpo.all_pair_logprobs(reference_params, loader, cfg) for loader in in_order]
reference_seconds = time.perf_counter() - t0
reference_batches = sum(len(loader) for loader in in_order)
print(f"{reference_batches} batches of 8 pairs in {reference_seconds:.1f} s")

train_loader = dpo.preference_loader(
    encoded[0], reference[0], shuffle=True, drop_last=True, **collate
)
val_loader, test_loader = (dpo.preference_loader(e, r, **collate)
                           for e, r in zip(encoded[1:], reference[1:], strict=True))  # fmt: skip
# DPO alone drove lab 7's SmolLM2 (measured at lr 1e-5, with and without the end token) to
# margins like the book's while both responses became less likely, the chosen ones by 1.2 nats
# per token: the policy answered every instruction with polite filler that never stopped. From
# SmolLM2 the lab therefore adds the chosen responses' log-likelihood to the loss, weighted like
# beta (RPO, `dpo_batch_loss`'s sft_weight); the book's GPT-2 runs plain DPO.
sft_weight = 0.1 if isinstance(cfg, LlamaConfig) and not QUICK else 0.0
batch_loss = jax.tree_util.Partial(dpo.dpo_batch_loss, cfg=cfg, beta=BETA, sft_weight=sft_weight)
loss0, aux0 = jax.jit(batch_loss)(reference_params, *next(iter(val_loader.batches(0))))
print(f"before training, first validation batch: DPO loss {float(aux0['dpo_loss']):.4f}, "
      f"reward margin {float(aux0['reward_margin']):.4f}, SFT weight {sft_weight}")  # fmt: skip

# %%
# The book's settings: AdamW lr 5e-6, weight decay 0.01, 1 epoch, evaluations every 5 steps.
# SmolLM2 (a Llama) moves about 4x more slowly than the book's GPT-2 355M at that step
# (measured: validation reward margin 0.015 after 40 steps, the book's 0.054), and the SFT term
# slows its margins further (at 1e-5 with it: validation margin 0.061, chosen preferred in 49%
# -> 56% of the pairs), so it gets 4x the step, and evaluations every 10 steps (30 blocks: a CPU
# evaluates slowly). 10x the step without the SFT term was too much: margins of 1.4, but the
# policy had made every response ~20 nats per token less likely (chosen reward -2.2) and
# answered everything with "....". Quick mode: a random tiny model needs a far larger step and
# two epochs to learn anything.
if QUICK:
    lr, num_epochs, eval_freq = 3e-3, 2, 10
elif isinstance(cfg, LlamaConfig):
    lr, num_epochs, eval_freq = 2e-5, 1, 10
else:
    lr, num_epochs, eval_freq = 5e-6, 1, 5
print(f"\n# 5.2) Training: AdamW lr {lr:g}, weight decay 0.01, beta {BETA}, {num_epochs} epoch(s)")
# The library's one training loop, with the DPO loss and its rewards as auxiliary metrics. The
# optimizer state exists for the policy only; the reference enters as numbers in the batches.
tx = make_optimizer(lr, weight_decay=0.01)
t0 = time.perf_counter()
state, history = fit(init_train_state(reference_params, tx), train_loader, val_loader, cfg, tx,
                     num_epochs=num_epochs, key=jax.random.key(123), loss=batch_loss,
                     has_aux=True, eval_freq=eval_freq, eval_iter=5)  # fmt: skip
train_seconds = time.perf_counter() - t0
policy_params = state.params
print(f"trained in {train_seconds / 60:.1f} min")

evaluations = len(history.steps)
book_reference_batches = num_epochs * len(train_loader) + evaluations * 2 * 5
saved = book_reference_batches * reference_seconds / reference_batches
print(
    f"the book's loop would run the reference on {book_reference_batches} batches "
    f"({num_epochs * len(train_loader)} steps, {evaluations} evaluations of 5 + 5); here it "
    f"ran on {reference_batches}: about {saved - reference_seconds:.0f} s of forward passes saved"
)

epochs_seen = (np.array(history.steps) + 1) / len(train_loader)  # where each evaluation ran
margins = {split: [m["reward_margin"] for m in getattr(history, f"{split}_metrics")]
           for split in ("train", "val")}  # fmt: skip
plot_losses(epochs_seen, history.tokens_seen, history.train_losses, history.val_losses,
            f"{RUNS}/loss.png")  # fmt: skip
plot_values(epochs_seen, history.examples_seen, margins["train"], margins["val"],
            f"{RUNS}/reward-margins.png", label="reward margin")  # fmt: skip
print(f"plots: {RUNS}/loss.png, {RUNS}/reward-margins.png")

# %%
print("\n# 6) The results: reward margins and preferences on pairs the policy never saw")
# Before training the policy is the reference: its margin is 0 by definition, and it prefers the
# chosen response wherever the reference gives that one the higher log-probability.
scores = {}
for name, loader, ref in (("val", val_loader, reference[1]), ("test", test_loader, reference[2])):
    policy = dpo.all_pair_logprobs(policy_params, loader, cfg)  # (N, 2)
    _, chosen, rejected = dpo.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], BETA)
    margin = float(chosen - rejected)
    before, after = np.mean(ref[:, 0] > ref[:, 1]), np.mean(policy[:, 0] > policy[:, 1])
    scores[name] = {"margin": margin, "before": before, "after": after}
    print(
        f"{name}: reward margin 0 -> {margin:.3f} ({margin / BETA:.2f} without beta, as the book "
        f"prints it); chosen preferred in {before:.1%} -> {after:.1%} of {len(ref)} pairs"
    )

answers = {  # quick mode: a random model's few words are enough
    name: generate_responses(
        p, test_data[:3], tokenizer, cfg, batch_size=3, max_new_tokens=24 if QUICK else 256
    )
    for name, p in (("reference", reference_params), ("policy", policy_params))
}
for i, entry in enumerate(test_data[:3]):
    print(f"\n{format_input(entry)}\n\nCorrect response:\n>> {entry['output']}")
    print(f"\nReference model response:\n>> {answers['reference'][i].response}")
    print(f"\nPolicy model response:\n>> {answers['policy'][i].response}\n{'-' * 40}")
ckpt_dir = os.path.abspath(f"{RUNS}/model")  # for `python -m gptflax generate --checkpoint`
if checkpoint.latest_step(ckpt_dir) is not None:
    shutil.rmtree(ckpt_dir)  # this lab's own previous run
meta = {"source": f"DPO on {about}", "tokenizer": tokenizer_name}
checkpoint.save_checkpoint(ckpt_dir, num_epochs, policy_params, cfg=cfg, meta=meta)
print(f"the policy: {ckpt_dir}")

# %%
print("\n# Checks")
assert len(data) == 1_100 and sizes == [935, 55, 110]
assert data[50]["chosen"] == "The correct spelling is 'Occasion.'"
assert data[50]["rejected"] == "The correct spelling is obviously 'Occasion.'"
assert masked_chosen == "### Response:\n" + train_data[0]["chosen"] + tokenizer.decode([end_id])
assert round(toy_logp, 4) == -1.4185 and round(float(same[0]), 4) == 0.6931
assert (
    abs(float(aux0["dpo_loss"]) - math.log(2)) < 1e-5 and abs(float(aux0["reward_margin"])) < 1e-5
)
assert all(
    r.shape == (len(e[0]), 2) and (r < 0).all() for r, e in zip(reference, encoded, strict=True)
)
# The reference is frozen: training left its params as they were.
assert np.array_equal(dpo.all_pair_logprobs(reference_params, val_loader, cfg), reference[1])
dpo_losses = [m["dpo_loss"] for m in history.val_metrics]
assert (
    dpo_losses[-1] < dpo_losses[0] < math.log(2) + 0.01
    and history.val_losses[-1] < history.val_losses[0]
)
for name, s in scores.items():
    assert s["margin"] > (0.01 if QUICK else 0.05), (name, s)
    assert s["after"] > s["before"] + 0.1, (name, s)
if not QUICK:  # a style change, not a broken model: the policy still answers in the format
    in_format = {name: sum(c.follows_format for c in a) for name, a in answers.items()}
    assert in_format["policy"] >= in_format["reference"], in_format
print(f"lab dpo: all checks passed (starting point: {about})")
