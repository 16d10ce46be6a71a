# %% [markdown]
# # Lab 5: pretraining on unlabeled data (chapter 5)
#
# Measure how wrong a fresh GPT is, train it on "The Verdict" with a jit-compiled AdamW step,
# watch the losses, sample with temperature and top-k, save and reload it with orbax, and load
# OpenAI's GPT-2 weights when they are on disk. By default this runs the book's experiment: the
# 124M model, context 256, 10 epochs (about 10 minutes on 2 CPU cores). GPTFLAX_QUICK=1 trains a
# tiny model for 3 epochs instead.

# %%
print("\n# §5.1.1 Using GPT to generate text, before any training")
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from labkit import QUICK, run_dir

from gptflax import checkpoint, files, models, sources
from gptflax.config import GPT_CONFIG_124M, TINY
from gptflax.data import train_val_loaders
from gptflax.generate import generate, sample_text, top_k_logits
from gptflax.losses import cross_entropy, loss_fn, perplexity
from gptflax.tokenizer import gpt2_tokenizer, text_to_token_ids, token_ids_to_text
from gptflax.training import calc_loss_loader, init_train_state, make_optimizer
from gptflax.training.run import Run, pretrain

RUNS = run_dir("lab5")  # runs/lab5, or runs/quick/lab5 in quick mode
cfg = TINY.replace(context_length=64) if QUICK else GPT_CONFIG_124M.replace(context_length=256)
NUM_EPOCHS = 3 if QUICK else 10
key_init, key_dropout, key_sample = jax.random.split(jax.random.key(123), 3)
tokenizer = gpt2_tokenizer()
params = models.init_params(key_init, cfg)
print(cfg)
start_context = "Every effort moves you"
out = generate(params, [text_to_token_ids(start_context, tokenizer)], 10, cfg)  # greedy
print("untrained:", repr(token_ids_to_text(out[0], tokenizer)))

# %%
print("\n# §5.1.2 The text generation loss: probabilities of the right next tokens")
inputs = jnp.array([[16833, 3626, 6100], [40, 1107, 588]])  # "every effort moves", "I really like"
targets = jnp.array(
    [[3626, 6100, 345], [1107, 588, 11311]]
)  # " effort moves you", " really like chocolate"

np.set_printoptions(precision=4, suppress=True)  # 4 digits, as the book prints
logits = models.forward(params, inputs, cfg)  # (2, 3, 50257)
probas = jax.nn.softmax(logits, axis=-1)
print("greedy ids:", probas.argmax(-1).tolist())
target_probas = jnp.take_along_axis(probas, targets[..., None], axis=-1)[..., 0]  # (2, 3)
neg_avg_log_probas = -jnp.log(target_probas).mean()
loss = float(cross_entropy(logits, targets))
print(f"by hand: {neg_avg_log_probas:.4f}   cross_entropy: {loss:.4f}")
print(f"uniform guessing: ln(50257) = {math.log(50257):.4f}")
print(f"perplexity: {perplexity(loss):,.0f} (of a vocabulary of 50,257)")

# %%
print('\n# §5.1.3 Training and validation losses on "The Verdict", split 90/10 by characters')
text_data = files.resolve("the-verdict.txt").read_text(encoding="utf-8")
split_idx = int(0.9 * len(text_data))
train_part, val_part = (
    text_to_token_ids(t, tokenizer) for t in (text_data[:split_idx], text_data[split_idx:])
)
print(f"characters {len(text_data):,}; tokens: train {len(train_part):,}, val {len(val_part):,}")
# The book's windows of 256 tokens (what GPT-2 is scored on in §5.5, in every mode) ...
book_train_loader, book_val_loader = train_val_loaders(text_data, 256, batch_size=2)
n_train, n_val = book_train_loader.num_examples, book_val_loader.num_examples
print(f"windows of 256: train {n_train}, validation {n_val}")
# ... and this run's, of cfg.context_length (64 in quick mode)
train_loader, val_loader = train_val_loaders(text_data, cfg.context_length, batch_size=2)


batch_loss = jax.jit(loss_fn)  # compiled once, reused for every batch


def eval_batch(x, y):
    return batch_loss(params, x, y, cfg)


initial_train_loss = calc_loss_loader(eval_batch, train_loader)
initial_val_loss = calc_loss_loader(eval_batch, val_loader)
print(f"before training: train loss {initial_train_loss:.4f}, val loss {initial_val_loss:.4f}")

# %%
print("\n# §5.2 Training: a jitted AdamW step, evaluation every 5 steps, a sample after each epoch")
# The whole run is one record (data, model, optimizer, evaluation, checkpoints); `pretrain`
# assembles it (the loaders above, AdamW, the state on this machine's devices) and runs the book's
# train_model_simple on gptflax's training loop. (`fit` is that loop over loaders of your own.)
run = Run(
    model="tiny" if QUICK else "124M",
    context_length=cfg.context_length,
    drop_rate=cfg.drop_rate,  # the book's 0.1; the tiny quick model trains without dropout
    epochs=NUM_EPOCHS,
    lr=4e-4,
    weight_decay=0.1,
    eval_freq=5,
    eval_iter=5,
    keep=1,
    seed=123,
)
print("the run:", json.dumps(run.to_dict()))
if (Path(RUNS) / "checkpoints").exists():
    shutil.rmtree(Path(RUNS) / "checkpoints")  # this lab's own previous run
result = pretrain(run, RUNS)  # with the same seed, the params above are its starting weights
state, history = result.state, result.history
params = state.params
final_train, final_val = history.train_losses[-1], history.val_losses[-1]
print(f"final: train loss {final_train:.3f}, val loss {final_val:.3f}; plot: {RUNS}/loss.png")

# %%
print("\n# §5.3 Decoding strategies on the chapter's toy vocabulary")
vocab = ["closer", "every", "effort", "forward", "inches", "moves", "pizza", "toward", "you"]
next_token_logits = jnp.array([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])
greedy_word = vocab[int(jnp.argmax(next_token_logits))]
print("greedy:", greedy_word)
draws = jax.random.categorical(key_sample, next_token_logits, shape=(1000,))
counts = np.bincount(np.asarray(draws), minlength=len(vocab))
print("1,000 samples at temperature 1:", dict(zip(vocab, counts.tolist(), strict=True)))


def softmax_with_temperature(logits, temperature):  # < 1 sharpens, > 1 flattens (§5.3.1)
    return jax.nn.softmax(logits / temperature, axis=-1)


for temperature in (1, 0.1, 5):
    print(f"T={temperature}:", softmax_with_temperature(next_token_logits, temperature).round(4))
pizza_t5 = float(softmax_with_temperature(next_token_logits, 5)[vocab.index("pizza")])
print(f'Exercise 5.1: "pizza" at temperature 5 has probability {pizza_t5:.4f}')
top3 = top_k_logits(next_token_logits, 3)
top3_probas = jax.nn.softmax(top3)
print("top-3 logits:", top3, "\nprobabilities:", top3_probas.round(4))
sampled = generate(
    params,
    [text_to_token_ids(start_context, tokenizer)],
    15,
    cfg,
    temperature=1.4,
    top_k=25,
    key=key_sample,
)
print("temperature 1.4, top-k 25:", repr(token_ids_to_text(sampled[0], tokenizer)))

# %%
print("\n# §5.4 Saving and loading: params and optimizer state, with orbax")
ckpt_dir = result.checkpoint.parent  # the run saved its last step, with the optimizer state
fresh = init_train_state(models.init_params(jax.random.key(0), cfg), make_optimizer(4e-4, 0.1))
loaded_params, loaded_train, _ = checkpoint.load_checkpoint(
    ckpt_dir,
    cfg=cfg,
    params_like=fresh.params,
    train_like={"step": fresh.step, "opt_state": fresh.opt_state},
)
same_params = all(
    jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, loaded_params))
)
same_text = sample_text(loaded_params, tokenizer, start_context, cfg, 20) == sample_text(
    params, tokenizer, start_context, cfg, 20
)
step_back = int(loaded_train["step"])
print(f"reloaded at step {step_back}: params identical {same_params}, same text {same_text}")

# %%
print("\n# §5.5 Loading OpenAI's GPT-2 124M weights (when they are on disk)")
try:
    _, gpt2_cfg, gpt2_params, *_ = sources.load_model("gpt2-124m")
except files.DataFileError as e:
    gpt2_cfg = None
    print("GPT-2 weights not available here, so this cell is skipped:\n", e)
if gpt2_cfg is not None:

    def gpt2_batch(x, y):
        return batch_loss(gpt2_params, x, y, gpt2_cfg)

    gpt2_train_loss = calc_loss_loader(gpt2_batch, book_train_loader)
    gpt2_val_loss = calc_loss_loader(gpt2_batch, book_val_loader)
    print(
        f"GPT-2 124M on The Verdict: train loss {gpt2_train_loss:.4f}, val loss {gpt2_val_loss:.4f}"
    )
    gpt2_ids = generate(gpt2_params, [text_to_token_ids(start_context, tokenizer)], 25, gpt2_cfg)
    gpt2_text = token_ids_to_text(gpt2_ids[0], tokenizer)
    print(repr(gpt2_text))

# %%
print("\n# Checks")
assert abs(neg_avg_log_probas - loss) < 1e-4  # cross_entropy == the hand computation
assert abs(loss - math.log(50257)) < 0.5  # a fresh model is about uniformly unsure
assert greedy_word == "forward"
np.testing.assert_allclose(top3_probas[jnp.array([3, 7, 0])], [0.5775, 0.3610, 0.0615], atol=5e-5)
assert int((top3_probas > 0).sum()) == 3
probas_t1 = softmax_with_temperature(next_token_logits, 1.0)
sharp, flat = (softmax_with_temperature(next_token_logits, t) for t in (0.1, 5.0))
assert sharp.max() > 0.99 and flat.max() < 0.25
assert round(pizza_t5, 4) == 0.0430
assert (len(train_part), len(val_part)) == (4_612, 534)
assert (n_train, n_val) == (18, 2)
assert counts.argmax() == 3 and np.abs(counts / 1000 - probas_t1).max() < 0.05  # sampling ~ softmax
assert same_params and same_text
if QUICK:  # a tiny model, 108 steps at the book's lr: measured 10.99 -> 8.94; perplexity / 4.5
    assert final_train < initial_train_loss - 1.5 and final_val < initial_val_loss - 1.0
else:  # the book's outcome (§5.2): the model memorises the training text
    assert final_train < 1.0 and final_val < 7.0
if gpt2_cfg is not None:  # the book's numbers with OpenAI's weights
    assert abs(gpt2_train_loss - 3.7547) < 0.01 and abs(gpt2_val_loss - 3.5596) < 0.01
    book_continuation = "forward.\n\nThe first step is to understand the importance of your work"
    assert gpt2_text.startswith(f"{start_context} {book_continuation}")
print("lab 5: all checks passed")
