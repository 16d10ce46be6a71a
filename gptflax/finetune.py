"""Classification fine-tuning (Book ch. 6): a new output head, a mostly frozen body, and the
prediction read from the last token (or the last real token, before the padding)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from gptflax import checkpoint, datasets, nn
from gptflax.config import GPT_CONFIG_124M, GPTConfig
from gptflax.model import count_params, embed, init_params, output_logits, run_blocks
from gptflax.tokenizer import EOT_ID
from gptflax.train import cross_entropy
from gptflax.weights import load_gpt2


def replace_out_head(params: dict, key: jax.Array, num_classes: int = 2) -> dict:
    """Swap the (D, vocab) output layer for a fresh (D, num_classes) one with a bias (§6.5)."""
    emb_dim = params["out_head"]["kernel"].shape[0]
    return {**params, "out_head": nn.init_linear(key, emb_dim, num_classes)}


def trainable_mask(params: dict, n_last_blocks: int = 1) -> dict:
    """1 where a parameter trains, 0 where it is frozen: the last n blocks, the final norm and the
    head, as the book's requires_grad settings (§6.5). Block leaves are stacked, so their mask is
    per layer: shape (n_layers, 1, ..., 1)."""

    def block_mask(leaf):
        n_layers = leaf.shape[0]
        on = jnp.arange(n_layers) >= n_layers - n_last_blocks
        return on.reshape((n_layers,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)

    mask = jax.tree.map(lambda leaf: jnp.zeros((), leaf.dtype), params)
    mask["trf_blocks"] = jax.tree.map(block_mask, params["trf_blocks"])
    for name in ("final_norm", "out_head"):
        mask[name] = jax.tree.map(lambda leaf: jnp.ones((), leaf.dtype), params[name])
    return mask


def count_trainable(params: dict, mask: dict) -> int:
    """How many scalars the mask lets train."""
    counts = jax.tree.map(lambda p, m: int(jnp.broadcast_to(m, p.shape).sum()), params, mask)
    return sum(jax.tree.leaves(counts))


def freeze(mask: dict) -> optax.GradientTransformation:
    """Zero the updates of frozen parameters; chain it after the optimizer, so that weight decay
    cannot move them either (torch skips parameters without gradients entirely)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * m, updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def classifier_forward(
    params: dict,
    tokens: jax.Array,
    cfg: GPTConfig,
    *,
    key: jax.Array | None = None,
    frozen_blocks: int = 0,
) -> jax.Array:
    """`model.forward`, with no gradient through the embeddings and the first `frozen_blocks`
    blocks, so that their backward pass is never computed: (B, T) ids -> (B, T, C)."""
    k_emb, k_frozen, k_rest = jax.random.split(key, 3) if key is not None else (None,) * 3
    x = embed(params, tokens, cfg, key=k_emb)  # (B, T, D)
    blocks = params["trf_blocks"]
    if frozen_blocks:
        first = jax.tree.map(lambda leaf: leaf[:frozen_blocks], blocks)
        x = jax.lax.stop_gradient(run_blocks(first, x, cfg, key=k_frozen))
        blocks = jax.tree.map(lambda leaf: leaf[frozen_blocks:], blocks)
    return output_logits(params, run_blocks(blocks, x, cfg, key=k_rest))


def classification_logits(
    params: dict,
    tokens: jax.Array,
    cfg: GPTConfig,
    *,
    key: jax.Array | None = None,
    pad_token_id: int | None = None,
    frozen_blocks: int = 0,
) -> jax.Array:
    """Class logits (B, C) read at the last position (the book, §6.6), or, with pad_token_id, at
    each row's last token before its right padding."""
    logits = classifier_forward(params, tokens, cfg, key=key, frozen_blocks=frozen_blocks)
    if pad_token_id is None:
        return logits[:, -1, :]
    last = jnp.maximum((tokens != pad_token_id).sum(axis=1) - 1, 0)  # (B,)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, :]


def classification_loss(
    params, tokens, labels, cfg, *, key=None, pad_token_id=None, frozen_blocks=0
) -> jax.Array:
    """Cross-entropy of the class logits against (B,) labels (Book §6.6's calc_loss_batch)."""
    logits = classification_logits(
        params, tokens, cfg, key=key, pad_token_id=pad_token_id, frozen_blocks=frozen_blocks
    )
    return cross_entropy(logits, labels)


def calc_accuracy_loader(
    params: dict,
    loader,
    cfg: GPTConfig,
    num_batches: int | None = None,
    pad_token_id: int | None = None,
) -> float:
    """Correct predictions / examples over the (first num_batches) batches (Book §6.6)."""
    correct = examples = 0
    for tokens, labels in loader.batches(0, num_batches):
        correct += int(_num_correct(params, tokens, labels, cfg, pad_token_id))
        examples += len(labels)
    return correct / examples


@partial(jax.jit, static_argnames="pad_token_id")
def _num_correct(params, tokens, labels, cfg, pad_token_id):
    logits = classification_logits(params, tokens, cfg, pad_token_id=pad_token_id)
    return (logits.argmax(axis=-1) == labels).sum()


def classify_review(
    text: str, params: dict, tokenizer, cfg: GPTConfig, max_length: int, pad_token_id: int = EOT_ID
) -> str:
    """ "spam" or "not spam" for one text, padded like the training data (Book §6.8)."""
    ids = tokenizer.encode(text)[: min(max_length, cfg.context_length)]
    tokens = jnp.array([ids + [pad_token_id] * (max_length - len(ids))])
    logits = classification_logits(params, tokens, cfg)
    return "spam" if int(logits.argmax(axis=-1)[0]) == 1 else "not spam"


FRESH_CFG = GPT_CONFIG_124M.replace(context_length=256)  # lab 5's model when none was saved


def starting_point(
    gpt2_sizes: tuple[str, ...] = ("124M",),
    checkpoint_dir: str | Path | None = None,
    fresh_cfg: GPTConfig = FRESH_CFG,
) -> tuple[str, GPTConfig, dict]:
    """(what, config, params) to fine-tune from, the first that exists of: OpenAI's GPT-2 in
    `gpt2_sizes` order, the latest checkpoint in `checkpoint_dir` (e.g. lab 5's model), and
    fresh random params of `fresh_cfg`. Dropout is switched off: the book fine-tunes without it.
    """
    for size in gpt2_sizes:
        try:
            cfg, params = load_gpt2(size)
            return f"OpenAI's GPT-2 {size}", cfg.replace(drop_rate=0.0), params
        except datasets.DataFileError as e:
            print(f"GPT-2 {size} weights not available: {str(e).splitlines()[0]}")
    if checkpoint_dir is not None and checkpoint.latest_step(checkpoint_dir) is not None:
        _, meta = checkpoint.read_meta(checkpoint_dir)
        cfg = meta["config"]
        like = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
        params, _, _ = checkpoint.load_checkpoint(checkpoint_dir, cfg=cfg, params_like=like)
        return f"the checkpoint in {checkpoint_dir}", cfg.replace(drop_rate=0.0), params
    params = init_params(jax.random.key(123), fresh_cfg)
    fresh = f"fresh random weights ({count_params(params):,} parameters)"
    if checkpoint_dir is not None:
        fresh += f"; no checkpoint in {checkpoint_dir} (run its lab first for a pretrained one)"
    return fresh, fresh_cfg.replace(drop_rate=0.0), params
