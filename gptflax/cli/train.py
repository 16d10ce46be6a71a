"""`python -m gptflax train`: the options of a pretraining run, parsed into a `Run` and trained
(`pretrain`) or continued (`resume_run`); a stopped run exits 130 (Ctrl-C) or 143 (SIGTERM)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax

from gptflax.cli.common import (
    add_process_options,
    check_process_options,
    flag,
    number,
    run_command,
    start_processes,
)
from gptflax.training.run import Run, pretrain, resume_run

STOPPED_STATUS = {"SIGINT": 130, "SIGTERM": 143}
DEFAULTS = Run()


# Every Run field is an option; argparse only converts the text, Run checks the value.
TRAIN_HELP = {
    "data": "a UTF-8 text file to train on (default: the book's the-verdict.txt), or a folder "
    "of token files (python -m gptflax prepare)",
    "train_ratio": "share of the text's characters to train on; the rest validates",
    "concatenate": "token files: let windows span documents, joined by the end-of-text token "
    "(--no-concatenate keeps each window inside one document)",
    "data_workers": "token files: processes that read batches ahead (grain's workers)",
    "model": "the architecture to train from scratch: GPT-2's 124M (the book's), 355M, 774M or "
    "1558M, tiny (2 layers of width 32, trains in seconds on a CPU: for trying things out), mini "
    "(4 layers of width 256, lab pretrain's), "
    "tiny-llama, tiny-gemma3, smollm2-135m or gemma3-270m",
    "init": "start from this model's weights instead (continued pretraining), e.g. "
    "smollm2-135m-instruct",
    "context_length": "tokens per training window",
    "drop_rate": "dropout rate (GPT models)",
    "lr": "learning rate, the peak with warmup",
    "weight_decay": "AdamW's decoupled decay",
    "warmup": "share of steps of linear warmup before cosine decay (appendix D: 0.2); 0 keeps "
    "the learning rate constant",
    "max_grad_norm": "clip gradients to this global norm after warmup (appendix D: 1.0)",
    "epochs": "passes over the training text, in all",
    "max_steps": "stop after this many optimizer steps, if sooner than the epochs end (the "
    "learning-rate schedule spans them)",
    "batch_size": "windows per step",
    "eval_freq": "evaluate every N steps",
    "eval_iter": "batches per evaluation",
    "start_context": "prompt of the sample printed after each epoch",
    "checkpoint_every": "save a checkpoint every N steps (default: at each epoch's end); one is "
    "also saved at the end and when the run is stopped",
    "keep": "how many of the newest checkpoints to keep",
    "bf16": "bf16 compute, float32 master weights (default: on a GPU or TPU, with the fastest "
    "measured settings there: fused attention when --drop-rate is 0, --pad-vocab 128, "
    "--loss-chunk 4096; off on a CPU, as the book's step)",
    "fused_attention": "jax.nn.dot_product_attention (cuDNN flash attention on GPUs); needs "
    "--drop-rate 0",
    "remat": "what the backward pass recomputes instead of keeping: none, dots (keeps the "
    "matmuls' outputs) or full (keeps each block's input): less memory, a larger batch fits",
    "pad_vocab": "round the head's vocabulary up to a multiple of this for its matmul (128 makes "
    "GPT-2's 50,257 into 50,304); the padding is never predicted",
    "loss_chunk": "run the output head and the loss this many positions at a time, never "
    "holding the full float32 logits (e.g. 4096; 0: all at once)",
    "accum_steps": "split each batch into this many micro-batches (gradient accumulation): the "
    "same step in less memory",
    "optimizer": "adamw (the book's) or muon (optax's Muon for the blocks' matrices, AdamW for "
    "the rest)",
    "strategy": "how the params and optimizer state are placed on the devices: a copy on each "
    "(dp), split over the data axis (fsdp), heads and hidden units split over the model axis "
    "(tp), or both (fsdp+tp); every batch is split over the data axis",
    "mesh": "the device mesh, e.g. data=4,model=2 (default: data over the devices that divide "
    "the batch; for tp, model over all devices)",
    "seed": "seed of the initial weights, the shuffling and dropout: same seed, same run",
}


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax train",
        usage="%(prog)s [DATA] [options]  (--help lists them)",
        description="Pretrain a model on a text file as chapter 5 does (the defaults are the "
        "book's settings), or on token files made by `python -m gptflax prepare`. Checkpoints "
        "and the loss plot go to --run-dir; --resume continues its latest checkpoint "
        "with the run's saved settings, changed only where you give an option.",
    )
    for f in dataclasses.fields(Run):
        default, kind = getattr(DEFAULTS, f.name), f.type.split(" |")[0]
        shown = "" if default is None else f" (default: {default})"
        if f.name == "data":
            p.add_argument("data", nargs="?", metavar="DATA", help=TRAIN_HELP[f.name])
            p.add_argument("--data", dest="data_option", metavar="DATA", help="the same as DATA")
        elif kind == "bool":
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                           help=TRAIN_HELP[f.name] + shown)  # fmt: skip
        else:
            p.add_argument(flag(f.name), type=number(kind) if kind in ("int", "float") else str,
                           default=None,
                           help=TRAIN_HELP[f.name].replace("%", "%%") + shown)  # fmt: skip
    p.add_argument(
        "--run-dir",
        default="runs/train",
        help="where checkpoints and plots go (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint")
    p.add_argument("--accept-new-data", action="store_true",
                   help="resume on data that differs from the run's")  # fmt: skip
    add_process_options(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def train_main(argv: list[str] | None = None) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    check_process_options(parser, args)
    if args.data_option is not None:
        if args.data is not None:
            parser.error("give the data once: as DATA or as --data, not both")
        args.data = args.data_option
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Run)
             if getattr(args, f.name) is not None}  # fmt: skip
    if "data" in given:
        given["data"] = str(Path(given["data"]).absolute())  # the run records where its text is
    try:
        run = Run(**given)  # checks every given value, also when resuming
    except ValueError as e:
        name, _, message = str(e).partition(": ")
        parser.error(f"argument {flag(name)}: {message}")
    return run_command(args, lambda: _train(args, given if args.resume else run))


def _train(args, run_or_changes) -> int:
    start_processes(args)
    if args.resume:
        result = resume_run(args.run_dir, accept_new_data=args.accept_new_data, **run_or_changes)
    else:
        result = pretrain(run_or_changes, args.run_dir)
    if jax.process_index() > 0:
        return STOPPED_STATUS.get(result.stopped, 0)
    h, kept = result.history, result.checkpoint
    if result.stopped:
        how = f"python -m gptflax train --run-dir {args.run_dir} --resume"
        print(f"stopped by {result.stopped}: step {kept.name} is kept in {kept.parent}; "
              f"continue with: {how}", file=sys.stderr)  # fmt: skip
        return STOPPED_STATUS[result.stopped]
    print(f"train loss {h.train_losses[-1]:.3f}, val loss {h.val_losses[-1]:.3f}; checkpoints in "
          f"{kept.parent}, loss plot {Path(args.run_dir) / 'loss.png'}")  # fmt: skip
    return 0
