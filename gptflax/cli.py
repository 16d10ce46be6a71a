"""Command lines: `python -m gptflax train|generate` (or `gptflax-train`, `gptflax-generate`)."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np

from gptflax import checkpoint, files
from gptflax.config import GPT2_PRESETS, TINY
from gptflax.data import train_val_loaders
from gptflax.families import family
from gptflax.generate import chat, generate, sample_text, trim_at_eos
from gptflax.losses import loss_fn, mixed_precision
from gptflax.parallel import data_mesh
from gptflax.plots import plot_losses
from gptflax.tokenizer import end_token_id, gpt2_tokenizer, tokenizer_for
from gptflax.train import fit, init_train_state, make_optimizer, resume, warmup_cosine_schedule
from gptflax.weights import load_gpt2, load_smollm2

PRESETS = {**GPT2_PRESETS, "tiny": TINY}


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax train",
        description="Pretrain a GPT on a text file, as chapter 5 does (the defaults are the book's "
        "settings: 124M model, context 256, batch 2, AdamW lr 4e-4, weight decay 0.1, 10 epochs). "
        "The first 90% of the characters train, the rest validate. Checkpoints (after every "
        "epoch) and the loss plot go to --run-dir; --resume continues from its last checkpoint.",
    )
    p.add_argument(
        "text", nargs="?", help="a UTF-8 text file (default: the book's the-verdict.txt)"
    )
    p.add_argument("--run-dir", default="runs/train", help="where checkpoints and plots go")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint")
    p.add_argument("--model", default="124M", choices=PRESETS, help="architecture preset")
    p.add_argument("--context-length", type=int, default=256, help="tokens per training window")
    p.add_argument("--drop-rate", type=float, default=0.1, help="dropout rate")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training text")
    p.add_argument("--batch-size", type=int, default=2, help="windows per step")
    p.add_argument("--lr", type=float, default=4e-4, help="learning rate (the peak, with warmup)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's decoupled decay")
    p.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="fraction of steps of linear warmup before cosine decay (appendix D: 0.2); "
        "0 keeps the learning rate constant",
    )
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip gradients to this global norm after warmup (appendix D: 1.0)",
    )
    p.add_argument("--train-ratio", type=float, default=0.9, help="share of the text to train on")
    p.add_argument("--eval-freq", type=int, default=5, help="evaluate every N steps")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--bf16", action="store_true", help="bf16 compute, float32 master weights")
    p.add_argument(
        "--fused-attention",
        action="store_true",
        help="jax.nn.dot_product_attention (cuDNN flash attention on GPUs); needs --drop-rate 0",
    )
    p.add_argument(
        "--start-context",
        default="Every effort moves you",
        help="prompt for the sample printed after each epoch",
    )
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    ckpt_dir = Path(args.run_dir).absolute() / "checkpoints"
    if checkpoint.latest_step(ckpt_dir) is not None and not args.resume:
        sys.exit(f"{ckpt_dir} holds checkpoints: pass --resume to continue, or another --run-dir")
    path = Path(args.text) if args.text else files.resolve("the-verdict.txt")
    if not path.is_file():
        sys.exit(f"no text file {path}")
    text = path.read_text(encoding="utf-8")
    try:
        cfg = PRESETS[args.model].replace(
            context_length=args.context_length,
            drop_rate=args.drop_rate,
            fused_attention=args.fused_attention,
        )
    except ValueError as e:
        sys.exit(f"bad model settings: {e}")
    try:
        train_loader, val_loader = train_val_loaders(
            text, cfg.context_length, args.batch_size, args.train_ratio, args.seed
        )
    except ValueError as e:
        sys.exit(f"{path}: {e} (or lower --context-length, or change --train-ratio)")
    total_steps = args.epochs * len(train_loader)
    warmup_steps = int(args.warmup * total_steps)
    lr = warmup_cosine_schedule(args.lr, total_steps, warmup_steps) if warmup_steps else args.lr
    tx = make_optimizer(
        lr, args.weight_decay, max_grad_norm=args.max_grad_norm, clip_from_step=warmup_steps
    )
    k_init, k_train = jax.random.split(jax.random.key(args.seed))
    state = init_train_state(family(cfg).init_params(k_init, cfg), tx)
    history = None
    if args.resume and checkpoint.latest_step(ckpt_dir) is not None:
        state, history = resume(ckpt_dir, state, cfg)
        print(f"resuming after epoch {history.epochs_done} (step {int(state.step)})")
    print(f"{path}: {len(text):,} characters; {len(train_loader)} batches per epoch; {cfg}")
    mesh = data_mesh(args.batch_size)
    print(f"data parallel over {mesh.size} of {len(jax.devices())} {jax.default_backend()} devices")
    tokenizer = gpt2_tokenizer()
    state, history = fit(
        state,
        train_loader,
        val_loader,
        cfg,
        tx,
        num_epochs=args.epochs,
        key=k_train,
        eval_freq=args.eval_freq,
        eval_iter=args.eval_iter,
        checkpoint_dir=ckpt_dir,
        history=history,
        sample_fn=lambda p: sample_text(p, tokenizer, args.start_context, cfg),
        mesh=mesh,
        loss=mixed_precision(partial(loss_fn, cfg=cfg)) if args.bf16 else None,
    )
    epochs = np.linspace(0, args.epochs, len(history.train_losses))
    plot = plot_losses(
        epochs,
        history.tokens_seen,
        history.train_losses,
        history.val_losses,
        Path(args.run_dir) / "loss.png",
    )
    print(
        f"train loss {history.train_losses[-1]:.3f}, val loss {history.val_losses[-1]:.3f}; "
        f"checkpoints in {ckpt_dir}, loss plot {plot}"
    )
    return 0


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax generate",
        description="Continue a prompt with a trained model (a checkpoint folder written by "
        "`python -m gptflax train`), OpenAI's GPT-2 weights or SmolLM2-135M-Instruct, or chat "
        "with SmolLM2 (--chat). Temperature 0 is greedy; above 0 it samples (Book §5.3), "
        "optionally from the top-k tokens only.",
    )
    p.add_argument("prompt", nargs="?", help="the text to continue")
    p.add_argument("--chat", metavar="MESSAGE", help="a user message to answer (chat models)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint folder, e.g. runs/train/checkpoints")
    src.add_argument("--gpt2", choices=GPT2_PRESETS, help="OpenAI's GPT-2 weights of this size")
    src.add_argument("--model", choices=["smollm2"], help="SmolLM2-135M-Instruct (a Llama)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=50, help="tokens to add at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--seed", type=int, default=123, help="sampling seed: same seed, same text")
    p.add_argument("--no-eos", action="store_true", help="do not stop at <|endoftext|>")
    return p


def load_for_generation(args) -> tuple:
    if args.gpt2:
        return load_gpt2(args.gpt2)
    if args.model:
        return load_smollm2()
    return checkpoint.load_model(args.checkpoint)


def generate_main(argv: list[str] | None = None) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.chat is None):
        parser.error("give a prompt to continue or --chat MESSAGE, not both and not neither")
    try:
        cfg, params = load_for_generation(args)
    except (checkpoint.CheckpointError, files.DataFileError, ValueError) as e:
        sys.exit(str(e))
    tokenizer = tokenizer_for(cfg)
    if args.chat is not None:
        if not hasattr(tokenizer, "encode_chat"):
            sys.exit("--chat needs a chat model (--model smollm2, or a checkpoint of one)")
        return _chat(args, cfg, params, tokenizer)
    ids = tokenizer.encode(args.prompt, allowed_special="all")
    if len(ids) >= cfg.context_length:
        sys.exit(
            f"the prompt has {len(ids)} tokens; this model's context holds "
            f"{cfg.context_length}: shorten the prompt"
        )
    eos = None if args.no_eos else end_token_id(tokenizer)
    out = generate(
        params,
        [ids],
        args.max_new_tokens,
        cfg,
        temperature=args.temperature,
        top_k=args.top_k,
        eos_id=eos,
        key=jax.random.key(args.seed),
    )
    new = trim_at_eos(out[0][len(ids) :], eos) if eos is not None else out[0][len(ids) :]
    print(args.prompt + tokenizer.decode([int(i) for i in new]))
    return 0


def _chat(args, cfg, params, tokenizer) -> int:
    messages = [{"role": "user", "content": args.chat}]
    if (n := len(tokenizer.encode_chat(messages))) >= cfg.context_length:
        sys.exit(f"the chat has {n} tokens; this model's context holds {cfg.context_length}")
    decoding = dict(temperature=args.temperature, top_k=args.top_k, key=jax.random.key(args.seed))
    print(chat(params, cfg, tokenizer, messages, args.max_new_tokens, **decoding))
    return 0


COMMANDS = {"train": train_main, "generate": generate_main}


def main(argv: list[str] | None = None) -> int:
    """`python -m gptflax COMMAND ...`: run one of COMMANDS with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m gptflax {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
