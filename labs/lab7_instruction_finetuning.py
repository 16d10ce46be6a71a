# %% [markdown]
# # Lab 7: instruction fine-tuning (chapter 7)
#
# A pretrained GPT only continues text. Trained further on 935 instruction / response pairs in one
# fixed prompt format, it learns to answer: it writes the response header, an answer, and an
# end-of-text token. Then it answers the 110 held-out test instructions, and the answers are
# scored: by loss and word overlap, by a local judge model that gptflax runs itself (its
# probability of replying "Yes"), and by a judge through Ollama when one runs.
#
# Starting weights: GPT-2 355M (the book's choice) or 124M when present, else SmolLM2-135M-Instruct
# (a Llama that already chats in its own format; here it learns the book's), else lab 5's model,
# else a fresh model. GPTFLAX_QUICK=1: a fresh tiny model.

# %%
print("\n# §7.2 The data: 1,100 entries, an Alpaca-style prompt")
# The book's split, in file order.
import json
import os
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from labkit import QUICK, run_dir, starting_model

from gptflax import checkpoint, files
from gptflax.config import TINY
from gptflax.instruct import (
    RESPONSE_HEADER,
    JudgeUnavailable,
    batch_shapes,
    custom_collate_fn,
    encode_entries,
    format_input,
    generate_model_scores,
    generate_responses,
    instruction_loader,
    judge_agreement,
    judge_check_entries,
    judge_yes_probabilities,
    load_instruction_data,
    split_instruction_data,
    token_f1,
)
from gptflax.losses import cross_entropy, loss_fn
from gptflax.plots import plot_losses
from gptflax.training import calc_loss_loader, fit, init_train_state, make_optimizer

RUNS = run_dir("lab7")  # runs/lab7, or runs/quick/lab7 in quick mode
data = load_instruction_data()
print(f"{len(data):,} entries; entry 50 as the model will see it:\n")
print(format_input(data[50]) + RESPONSE_HEADER + data[50]["output"])
train_data, val_data, test_data = split_instruction_data(data)
sizes = [len(d) for d in (train_data, val_data, test_data)]
print(f"\ntrain / val / test: {sizes}")
if QUICK:
    train_data = train_data[:200]  # quick mode trains on the first 200 only

# %%
print("\n# §7.3 Batches: pad with the end token, shift, keep the first end token, ignore the rest")
inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
print("inputs:\n", inputs, "\ntargets:\n", targets)
toy_logits = jnp.array([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
toy_losses = [
    float(cross_entropy(toy_logits[:n], jnp.array(t)))
    for n, t in ((2, [0, 1]), (3, [0, 1, 1]), (3, [0, 1, -100]))
]
print("toy losses (2 rows, 3 rows, 3rd row ignored):", [round(v, 4) for v in toy_losses])

# %%
print("\n# §7.5 The starting weights (before the loaders: they cut batches to its context length)")
if QUICK:
    start = starting_model((), fresh_cfg=TINY.replace(context_length=128), smollm2=False)
else:
    start = starting_model(("355M", "124M"), os.path.abspath("runs/lab5/checkpoints"))
cfg, params, tokenizer = start.cfg, start.params, start.tokenizer
print(f"starting point: {start.about}\n{cfg}")

# %%
print("\n# §7.4 Loaders of 8 examples")
# Lengths rounded up to multiples of 32, so jit compiles about twice. Padding and the end of each
# response: the tokenizer's end token (GPT-2's <|endoftext|>, SmolLM2's <|im_end|>).
(train_ids, _), (val_ids, _), (test_ids, _) = (
    encode_entries(d, tokenizer) for d in (train_data, val_data, test_data)
)

np.set_printoptions(precision=4, suppress=True)  # 4 digits, as the book prints
collate = dict(
    pad_to_multiple=32, allowed_max_length=cfg.context_length, pad_token_id=tokenizer.eos_id
)
train_loader = instruction_loader(train_ids, 8, shuffle=True, drop_last=True, **collate)
val_loader, test_loader = (instruction_loader(ids, 8, **collate) for ids in (val_ids, test_ids))
# The book's 2 epochs; SmolLM2 already follows instructions (in its own chat format) and learns the
# book's format in one (a step costs 10 s on 2 cores).
NUM_EPOCHS = 1 if start.kind == "smollm2" else 2
shapes = batch_shapes(train_loader, NUM_EPOCHS)
longest = max(len(ids) for ids in train_ids + val_ids + test_ids)
print(f"longest example {longest} tokens; train batches per epoch {len(train_loader)}")
print(f"train batch shapes over {NUM_EPOCHS} epochs: {sorted(shapes)}: the step compiles", end=" ")
print(f"{len(shapes)} times (per-batch lengths, as in the book, would give ~40 shapes)")

# %%
print("\n# Before fine-tuning: losses, and what the model writes")
eval_loss = jax.jit(partial(loss_fn, cfg=cfg))


def losses(p):
    """Mean loss on the first 10 training batches and on all of validation and test."""
    loss_of = partial(eval_loss, p)
    return {
        "train": calc_loss_loader(loss_of, train_loader, num_batches=10),
        "val": calc_loss_loader(loss_of, val_loader),
        "test": calc_loss_loader(loss_of, test_loader),
    }


before = losses(params)
print("loss before fine-tuning:", {k: round(v, 4) for k, v in before.items()})
val_5 = calc_loss_loader(partial(eval_loss, params), val_loader, num_batches=5)
print(f"validation loss over the first 5 batches, as the book measures it: {val_5:.4f}")
completions_before = generate_responses(params, test_data, tokenizer, cfg)


def first_val_answer(p):  # the book's example (§7.5): validation entry 0
    return generate_responses(p, val_data[:1], tokenizer, cfg, batch_size=1)[0]


val0_before = first_val_answer(params)  # GPT-2 355M only echoes the sentence back
print(f"before fine-tuning, {format_input(val_data[0])!r}\ngets: {val0_before.text[:200]!r}")

# %%
print(
    f"\n# §7.6 Fine-tuning with the book's settings: AdamW, weight decay 0.1, {NUM_EPOCHS} epochs"
)
# The book's 5e-5 suits GPT-2, which already writes English; SmolLM2 gets 1e-4 for its one epoch.
# Lab 5's model has read one short story (5,000 tokens), so it gets a larger step, and a tiny
# random model a larger one still. SmolLM2's 30 blocks make an evaluation cost half a minute on a
# CPU: it evaluates less often.
lr = {"gpt2": 5e-5, "smollm2": 1e-4}.get(start.kind, 1e-3 if QUICK else 2e-4)
tx = make_optimizer(lr, weight_decay=0.1)
eval_freq = 25 if start.kind == "smollm2" else 5


state, history = fit(
    init_train_state(params, tx),
    train_loader,
    val_loader,
    cfg,
    tx,
    num_epochs=NUM_EPOCHS,
    key=jax.random.key(123),
    eval_freq=eval_freq,
    eval_iter=5,
    sample_fn=lambda p: first_val_answer(p).text,
)
tuned = state.params
epochs_seen = np.linspace(0, NUM_EPOCHS, len(history.train_losses))
plot_losses(epochs_seen, history.tokens_seen, history.train_losses, history.val_losses,
            f"{RUNS}/loss.png")  # fmt: skip
after = losses(tuned)
print("loss after fine-tuning:", {k: round(v, 4) for k, v in after.items()})

# %%
print("\n# §7.7 Answers for the test set: batched, KV-cached, greedy, stopping at the end token")
completions = generate_responses(tuned, test_data, tokenizer, cfg)
for entry, completion in list(zip(test_data, completions, strict=True))[:3]:
    print(f"{format_input(entry)}\n\nCorrect response:\n>> {entry['output']}")
    print(f"\nModel response:\n>> {completion.response}\n{'-' * 40}")
with_responses = [
    {**entry, "model_response": c.response} for entry, c in zip(test_data, completions, strict=True)
]
responses_path = files.save_json(with_responses, f"{RUNS}/instruction-data-with-response.json")
ckpt_dir = os.path.abspath(f"{RUNS}/model")
if checkpoint.latest_step(ckpt_dir) is not None:
    shutil.rmtree(ckpt_dir)  # this lab's own previous run
checkpoint.save_checkpoint(
    ckpt_dir,
    NUM_EPOCHS,
    tuned,
    cfg=cfg,
    meta={"source": start.about, "tokenizer": start.tokenizer_name},
)
reloaded, _, _ = checkpoint.load_checkpoint(ckpt_dir, cfg=cfg, params_like=tuned)
print(f"responses: {responses_path}; model: {ckpt_dir}")

# %%
print("\n# §7.8 Scores")
# Offline: answers in the response format, and word overlap with the references.
in_format = np.mean([c.follows_format for c in completions])
in_format_before = np.mean([c.follows_format for c in completions_before])


def mean_f1(completions):
    pairs = zip(completions, test_data, strict=True)
    return np.mean([token_f1(c.response, entry["output"]) for c, entry in pairs])


f1, f1_before = mean_f1(completions), mean_f1(completions_before)
print(f"answers in the response format: {in_format_before:.1%} before, {in_format:.1%} after")
print(f"word-overlap F1 with the references: {f1_before:.3f} before, {f1:.3f} after")
# A local judge, offline: the largest instruct model here, through gptflax itself. Not asked for
# a 0-100 number (the book's prompt); its log-probabilities of replying "Yes" and "No" are read,
# after it is checked on answers labelled by hand as right, partly right and wrong.
from gptflax.sources import load_model

judge = load_model("tiny-llama" if QUICK else "qwen2.5-coder-1.5b-instruct")
checks = judge_check_entries()
p_checks = judge_yes_probabilities(judge, checks)
for entry, p in zip(checks, p_checks, strict=True):
    print(f"{entry['label']:>6}  P(yes) {p:.2f}  {entry['instruction']} {entry['input']}"
          f" -> {entry['model_response']}")  # fmt: skip
agreement = judge_agreement(checks, p_checks)
labels = np.array([e["label"] for e in checks])
mean_p = {label: p_checks[labels == label].mean() for label in ("right", "partly", "wrong")}
print(f"{judge.name}: agrees on {agreement:.0%} of the right and wrong answers; mean P(yes) "
      + ", ".join(f"{label} {p:.2f}" for label, p in mean_p.items()))  # fmt: skip
p_test = judge_yes_probabilities(judge, with_responses)
print(f"local judge on the 110 answers: mean P(yes) {p_test.mean():.3f}, "
      f"{np.mean(p_test > 0.5):.1%} judged correct")  # fmt: skip
# With a judge: `ollama serve` and `ollama pull llama3` on this machine, as in the book.
try:
    scores, unreadable = generate_model_scores(with_responses, model="llama3")
    print(f"judge (llama3): average score {np.mean(scores):.2f} over {len(scores)} answers")
    print(f"({unreadable} replies without a score)")
except JudgeUnavailable as e:
    print(f"judge skipped: {e}")

# %%
print("\n# Checks")
assert len(data) == 1_100 and sizes == [935, 55, 110]
assert (
    val_data[0]["instruction"]
    == "Convert the active sentence to passive: 'The chef cooks the meal every day.'"
)
assert inputs.tolist()[1] == [5, 6, 50256, 50256, 50256] and targets.tolist()[1] == [
    6, 50256, -100, -100, -100
]  # fmt: skip
assert np.allclose(toy_losses, [1.1269, 0.7936, 1.1269], atol=1e-4)
assert len(shapes) <= 3 and longest <= cfg.context_length
saved = json.loads(responses_path.read_text())
assert len(saved) == 110 and all(
    s["model_response"] == c.response for s, c in zip(saved, completions, strict=True)
)
assert all(jax.tree.leaves(jax.tree.map(np.array_equal, reloaded, tuned)))
assert after["val"] < before["val"]  # fine-tuning lowers the validation loss, from any start
assert len(p_test) == len(with_responses) and ((p_checks > 0) & (p_checks < 1)).all()
if not QUICK:  # measured: agreement 80% (5/5 right, 3/5 wrong); mean P(yes) right 0.77, wrong 0.42
    assert agreement >= 0.7, agreement
    assert mean_p["right"] > max(mean_p["partly"], mean_p["wrong"]), mean_p
if start.gpt2_size == "355M":  # the book's reference: 3.7619 before, ~0.65 after
    assert abs(val_5 - 3.7619) < 0.01 and after["val"] < 0.8
    assert val0_before.response.startswith("The chef cooks the meal every day.")
if start.kind == "gpt2":  # GPT-2 follows the response format after 2 epochs (§7.7's examples)
    assert in_format >= 0.8, in_format
# Lab 5's model fine-tuned here (lr 2e-4, 47 min on 2 cores): validation loss 9.15 -> 1.92,
# answers in the format 0% -> 90.9%, word-overlap F1 0.029 -> 0.221 (README).
LAB5_MODEL = {"in_format": 0.909, "f1": 0.221}
if QUICK:  # measured: val loss 10.96 -> 7.93 (200 examples, 50 steps); format not learned yet
    assert after["val"] < before["val"] - 2.0
elif start.kind == "smollm2":  # a model that can speak: clearly better than both. Measured
    # (19 min): validation loss 2.51 -> 0.54, in the format 4.5% -> 95.5%, F1 0.098 -> 0.632
    assert in_format > max(in_format_before, LAB5_MODEL["in_format"]), in_format
    assert f1 > max(f1_before, LAB5_MODEL["f1"]) + 0.05, (f1_before, f1)
elif start.kind != "gpt2":
    assert after["val"] < before["val"] - 4.0
    assert in_format >= 0.8 and f1 > f1_before + 0.1
print(f"lab 7: all checks passed (starting point: {start.about})")
