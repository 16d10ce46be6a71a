# %% [markdown]
# # Lab 6: fine-tuning for classification (chapter 6)
#
# Turn a GPT into a spam classifier: balance and split the SMS Spam Collection, pad the texts,
# swap the 50,257-way output head for a 2-way one, freeze everything but the last block, the final
# norm and the head, train, and classify new messages.
#
# Starting weights, in order of preference: OpenAI's GPT-2 124M (the book's setting: AdamW 5e-5,
# 5 epochs, test accuracy >= 95%), else SmolLM2-135M-Instruct, a Llama (2 epochs, AdamW 2e-4,
# predictions read at the last real token: the book's band too), else the model lab 5 pretrained
# on "The Verdict", else a fresh random model (2 epochs for these two). GPTFLAX_QUICK=1 uses a
# fresh tiny model, 2 epochs.

# %%
print("\n# §6.2 The dataset: balanced, then split 70/10/20")
import os
from functools import partial

import jax
import numpy as np
import optax
from flax import nnx
from labkit import QUICK, run_dir, starting_model

from gptflax import checkpoint, nn
from gptflax.config import TINY, GPTConfig
from gptflax.data import DataLoader
from gptflax.finetune import (
    balanced_spam,
    calc_accuracy_loader,
    classify_review,
    count_trainable,
    encode_padded,
    freeze,
    load_sms_spam,
    random_split,
    replace_out_head,
    spam_loaders,
    trainable_mask,
)
from gptflax.losses import classification_loss, classifier_forward, read_class_logits
from gptflax.nnx_model import GPTModel
from gptflax.plots import plot_values
from gptflax.training import calc_loss_loader, fit, init_train_state, make_optimizer

np.set_printoptions(precision=4, suppress=True)  # 4 digits, as the book prints

RUNS = run_dir("lab6")  # runs/lab6, or runs/quick/lab6 in quick mode
rows = load_sms_spam()
print(f"{len(rows):,} messages:", {k: sum(r[0] == k for r in rows) for k in ("ham", "spam")})
texts, labels = balanced_spam(rows)
splits = random_split(texts, labels, 0.7, 0.1)  # = finetune.spam_splits()
test_texts = splits[2][0]
sizes = [len(t) for t, _ in splits]
print(f"balanced: {len(texts):,}; train / val / test: {sizes}")

# %%
print("\n# §6.4 The starting weights (before the loaders: they pad with its tokenizer's end token)")
# GPT-2 124M, else SmolLM2-135M-Instruct, else lab 5's model, else fresh. Quick mode: a fresh
# tiny model.
if QUICK:
    start = starting_model((), fresh_cfg=TINY.replace(context_length=128), smollm2=False)
else:
    start = starting_model(("124M",), os.path.abspath("runs/lab5/checkpoints"))
cfg, params, tokenizer = start.cfg, start.params, start.tokenizer
print(f"starting point: {start.about}\n{cfg}")

# %%
print("\n# §6.3 Data loaders: pad every text with the end token to the longest training text")
# GPT-2's <|endoftext|> (50256); SmolLM2's <|im_end|> (2), its padding id.
pad_id = tokenizer.eos_id
train_loader, val_loader, test_loader = spam_loaders(tokenizer, splits, batch_size=8)
x_test, y_test = test_loader.arrays
max_length = x_test.shape[1]
num_batches = [len(loader) for loader in (train_loader, val_loader, test_loader)]
print(f"padded to {max_length} tokens with id {pad_id}; batches: {num_batches}")
assert max_length <= cfg.context_length
# The book reads the prediction at the last position, padding for most texts. GPT-2 learns to
# carry the text there; SmolLM2 learns it slowly (94-96% test accuracy after 5 epochs, measured),
# so from SmolLM2 the lab reads at each text's last real token (97% after 2). The last section
# compares both.
read_at = start.read_at  # a padding id, or None: the last position


# %%
print("\n# §6.5 A classification head, and freezing all but the last block, final norm and head")
params = replace_out_head(params, jax.random.key(123), num_classes=2)
mask = trainable_mask(params, n_last_blocks=1)
n_trainable = count_trainable(params, mask)
print(f"trainable: {n_trainable:,} of {nn.count_params(params):,} parameters")
# The NNX way (the GPT has an NNX twin): swap the module, then pick the trainable parameters with
# a filter.
if isinstance(cfg, GPTConfig):
    twin = nnx.eval_shape(lambda: GPTModel(cfg, rngs=nnx.Rngs(0)))
    twin.out_head = nnx.eval_shape(lambda: nnx.Linear(cfg.emb_dim, 2, rngs=nnx.Rngs(0)))
    trainable_filter = nnx.All(
        nnx.Param,
        nnx.Any(
            nnx.PathContains(cfg.n_layers - 1),
            nnx.PathContains("final_norm"),
            nnx.PathContains("out_head"),
        ),
    )
    n_trainable_nnx = sum(x.size for x in jax.tree.leaves(nnx.state(twin, trainable_filter)))
    print(f"NNX filter selects {n_trainable_nnx:,} trainable parameters")

# %%
print("\n# §6.6 Loss and accuracy before fine-tuning: about a coin flip")
before = {
    name: calc_accuracy_loader(params, loader, cfg, num_batches=10, pad_token_id=read_at)
    for name, loader in (("train", train_loader), ("val", val_loader), ("test", test_loader))
}
print("accuracy before fine-tuning (10 batches):", before)
loss_before = {
    name: calc_loss_loader(
        lambda x, y: classification_loss(params, x, y, cfg, pad_token_id=read_at), loader, 5
    )
    for name, loader in (("train", train_loader), ("val", val_loader), ("test", test_loader))
}
print("loss before fine-tuning (5 batches):", {k: round(v, 3) for k, v in loss_before.items()})

# %%
print("\n# §6.7 Fine-tuning: AdamW, weight decay 0.1, gradients only where the mask allows")
num_epochs = 5 if start.kind == "gpt2" else 2  # the book's 5; 2 keep CPU runs short
# A tiny random model needs a larger step to learn in 2 epochs, SmolLM2 a larger one than GPT-2.
lr = 1e-3 if QUICK else 2e-4 if start.kind == "smollm2" else 5e-5
print(f"learning rate {lr:g}, {num_epochs} epochs")
tx = optax.chain(make_optimizer(lr, weight_decay=0.1), freeze(mask))
loss = partial(classification_loss, cfg=cfg, frozen_blocks=cfg.n_layers - 1, pad_token_id=read_at)


def epoch_accuracies(p):
    return {
        "train_acc": calc_accuracy_loader(p, train_loader, cfg, 5, pad_token_id=read_at),
        "val_acc": calc_accuracy_loader(p, val_loader, cfg, 5, pad_token_id=read_at),
    }


state, history = fit(
    init_train_state(params, tx),
    train_loader,
    val_loader,
    cfg,
    tx,
    num_epochs=num_epochs,
    key=jax.random.key(0),
    loss=loss,
    eval_freq=50,
    eval_iter=5,
    epoch_metrics=epoch_accuracies,
)
tuned = state.params
epochs_seen = np.linspace(0, num_epochs, len(history.train_losses))
train_losses, val_losses = history.train_losses, history.val_losses
plot_values(epochs_seen, history.examples_seen, train_losses, val_losses, f"{RUNS}/loss.png")
train_accs = [a["train_acc"] for a in history.epoch_metrics]
val_accs = [a["val_acc"] for a in history.epoch_metrics]
examples = [len(train_loader) * 8 * (e + 1) for e in range(num_epochs)]
epochs = np.arange(1, num_epochs + 1)
plot_values(epochs, examples, train_accs, val_accs, f"{RUNS}/accuracy.png", label="accuracy")

# %%
print("\n# §6.8 Accuracy on the whole splits, and classifying new messages")
after = {
    name: calc_accuracy_loader(tuned, loader, cfg, pad_token_id=read_at)
    for name, loader in (("train", train_loader), ("val", val_loader), ("test", test_loader))
}
print("accuracy after fine-tuning:", after)
spam_text = (
    "You are a winner you have been specially selected to receive $1000 cash or a $2000 award."
)
ham_text = "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"
verdicts = [
    classify_review(t, tuned, tokenizer, cfg, max_length, at_last_real_token=read_at is not None)
    for t in (spam_text, ham_text)
]
print(verdicts)

# %%
print("\n# Last position, or last real token?")
# The last position is padding for every text shorter than 120 tokens, so a prediction read there
# can depend on how much padding follows the text; one read at the text's last real token cannot
# (causal attention). Pad the test texts to 128 instead of 120 and count changed predictions:
x_test_128 = encode_padded(test_texts, tokenizer, max_length=128)


@jax.jit
def both_readings(tokens):
    """Predictions read at the last position and at the last real token, from one forward."""
    logits = classifier_forward(tuned, tokens, cfg)  # (B, T, 2)
    return tuple(read_class_logits(logits, tokens, at).argmax(-1) for at in (None, pad_id))


def predictions(x):
    batches = [both_readings(t) for t, _ in DataLoader(x, y_test, batch_size=20)]  # 300 = 15 * 20
    return [np.concatenate([np.asarray(b[i]) for b in batches]) for i in (0, 1)]


(last_120, real_120), (last_128, real_128) = predictions(x_test), predictions(x_test_128)
changed_last, changed_real = int((last_120 != last_128).sum()), int((real_120 != real_128).sum())
print(
    f"predictions changed by 8 more padding tokens: last position {changed_last} of 300, "
    f"last real token {changed_real} of 300"
)
test_last, test_last_real = float(np.mean(last_120 == y_test)), float(np.mean(real_120 == y_test))
trained_on = "the last position" if read_at is None else "the last real token"
print(
    f"test accuracy read at the last position {test_last:.4f}, at the last real token "
    f"{test_last_real:.4f} (the head was trained on {trained_on})"
)

# %%
print("\n# Saving and loading the classifier")
ckpt_dir = os.path.abspath(f"{RUNS}/classifier")
if checkpoint.latest_step(ckpt_dir) is not None:
    import shutil

    shutil.rmtree(ckpt_dir)  # this lab's own previous run
checkpoint.save_checkpoint(
    ckpt_dir,
    num_epochs,
    tuned,
    cfg=cfg,
    meta={"max_length": max_length, "tokenizer": start.tokenizer_name},
)
reloaded, _, meta = checkpoint.load_checkpoint(ckpt_dir, cfg=cfg, params_like=tuned)
same = all(jax.tree.leaves(jax.tree.map(np.array_equal, reloaded, tuned)))
print(f"reloaded classifier: the same weights {same}, max_length {meta['max_length']}")

# %%
print("\n# Checks")
assert len(rows) == 5_572 and len(texts) == 1_494
assert sizes == [1_045, 149, 300]
assert max_length == 120 and (len(train_loader), len(val_loader), len(test_loader)) == (130, 19, 38)
assert not isinstance(cfg, GPTConfig) or n_trainable == n_trainable_nnx
one_block = nn.count_params(tuned["trf_blocks"]) // cfg.n_layers  # (fit consumed `params`)
norm = cfg.emb_dim * (2 if isinstance(cfg, GPTConfig) else 1)  # a layer norm shifts, RMSNorm not
assert n_trainable == one_block + norm + cfg.emb_dim * 2 + 2
assert same and meta["max_length"] == max_length
assert (test_last if read_at is None else test_last_real) == after["test"]  # computed twice
assert changed_real == 0  # causal attention: the padding after a text cannot change its token
assert val_losses[-1] < loss_before["val"]  # fine-tuning lowers the (5-batch) validation loss
if start.kind == "gpt2":  # the book's band (§6.8: 95.67% test accuracy) and verdicts
    assert after["test"] >= 0.95 and verdicts == ["spam", "not spam"], (after, verdicts)
elif start.kind == "smollm2":  # measured: 99.1% train, 98.7% val, 96.7% test (17.5 min, 2 cores).
    # The book's invented spam text has no number to call and no prize to claim, what the spam in
    # the data always has; SmolLM2's classifier sits on the fence there (48.8% spam, measured).
    assert after["test"] >= 0.95 and verdicts[1] == "not spam", (after, verdicts)
else:  # measured: quick 84.3% test / 85.2% val; from lab 5's model (2 epochs) 85.3% / 83.9%;
    # either way far above the 50% of a coin flip on the balanced data
    assert after["test"] >= (0.70 if QUICK else 0.80), after
    assert after["val"] >= (0.70 if QUICK else 0.80), after
print(f"lab 6: all checks passed (starting point: {start.about})")
