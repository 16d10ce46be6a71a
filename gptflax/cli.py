"""Command lines: `python -m gptflax train|generate` (or `gptflax-train`, `gptflax-generate`)."""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np

from gptflax import checkpoint, files, models, parallel, sources
from gptflax.config import GPT2_PRESETS, TINY
from gptflax.data import train_val_loaders
from gptflax.generate import chat, generate, sample_text, trim_at_eos
from gptflax.gguf import GGUFError
from gptflax.losses import loss_fn, mixed_precision
from gptflax.plots import plot_losses
from gptflax.tokenizer import gpt2_tokenizer
from gptflax.train import fit, init_train_state, make_optimizer, resume, warmup_cosine_schedule

PRESETS = {**GPT2_PRESETS, "tiny": TINY}
# Options that are not settings of the run itself: a resumed run takes them afresh.
RUN_ONLY = {
    "resume",
    "run_dir",
    "debug",
    "distributed",
    "coordinator",
    "num_processes",
    "process_id",
}


class CommandError(Exception):
    """A bad input found after the options were parsed: reported in one line, exit status 1."""


def _ranged(kind: type, ok, what: str):
    """An argparse type: the text as `kind` (int or float), accepted when ok(value)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            name = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {name}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


AT_LEAST_1 = _ranged(int, lambda v: v >= 1, "at least 1")
ABOVE_0 = _ranged(float, lambda v: v > 0, "above 0")
NOT_NEGATIVE = _ranged(float, lambda v: v >= 0, "0 or more")
FRACTION = _ranged(float, lambda v: 0 <= v < 1, "at least 0 and below 1")
SHARE = _ranged(float, lambda v: 0 < v < 1, "between 0 and 1")


def _mesh_sizes(text: str) -> dict[str, int]:
    try:
        return parallel.parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax train",
        usage="%(prog)s [TEXT] [options]  (--help lists them)",
        description="Pretrain a GPT on a text file, as chapter 5 does (the defaults are the book's "
        "settings). The first 90%% of the characters train, the rest validate. Checkpoints "
        "(after every epoch) and the loss plot go to --run-dir; --resume continues from its last "
        "checkpoint with the run's saved settings, changed only where you give an option.",
    )
    p.add_argument(
        "text", nargs="?", help="a UTF-8 text file (default: the book's the-verdict.txt)"
    )
    p.add_argument(
        "--run-dir",
        default="runs/train",
        help="where checkpoints and plots go (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint")
    p.add_argument(
        "--model",
        default="124M",
        choices=PRESETS,
        help="the architecture: GPT-2's 124M (the book's), 355M, 774M or 1558M, or tiny (2 "
        "layers of width 32, trains in seconds on a CPU: for trying things out) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--context-length",
        type=AT_LEAST_1,
        default=256,
        help="tokens per training window (default: %(default)s)",
    )
    p.add_argument(
        "--drop-rate", type=FRACTION, default=0.1, help="dropout rate (default: %(default)s)"
    )
    p.add_argument(
        "--epochs",
        type=AT_LEAST_1,
        default=10,
        help="passes over the training text, in all (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=AT_LEAST_1, default=2, help="windows per step (default: %(default)s)"
    )
    p.add_argument(
        "--lr",
        type=ABOVE_0,
        default=4e-4,
        help="learning rate, the peak with warmup (default: %(default)s)",
    )
    p.add_argument(
        "--weight-decay",
        type=NOT_NEGATIVE,
        default=0.1,
        help="AdamW's decoupled decay (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=FRACTION,
        default=0.0,
        help="fraction of steps of linear warmup before cosine decay (appendix D: 0.2); "
        "0 keeps the learning rate constant (default: %(default)s)",
    )
    p.add_argument(
        "--max-grad-norm",
        type=ABOVE_0,
        default=None,
        help="clip gradients to this global norm after warmup (appendix D: 1.0; default: no "
        "clipping)",
    )
    p.add_argument(
        "--train-ratio",
        type=SHARE,
        default=0.9,
        help="share of the text to train on (default: %(default)s)",
    )
    p.add_argument(
        "--eval-freq",
        type=AT_LEAST_1,
        default=5,
        help="evaluate every N steps (default: %(default)s)",
    )
    p.add_argument(
        "--eval-iter",
        type=AT_LEAST_1,
        default=5,
        help="batches per evaluation (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=123,
        help="seed of the initial weights, the "
        "shuffling and dropout: same seed, same run (default: %(default)s)",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="bf16 compute, float32 master weights",
    )
    p.add_argument(
        "--fused-attention",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="jax.nn.dot_product_attention (cuDNN flash attention on GPUs); needs --drop-rate 0",
    )
    p.add_argument(
        "--strategy",
        default="dp",
        choices=["dp", "fsdp", "tp", "fsdp+tp"],
        help="how the params and optimizer state are placed on the devices: a copy on each "
        "(dp), split over the data axis (fsdp), heads and hidden units split over the model axis "
        "(tp), or both (fsdp+tp); every batch is split over the data axis (default: %(default)s)",
    )
    p.add_argument(
        "--mesh",
        type=_mesh_sizes,
        help="the device mesh, e.g. data=4,model=2 (default: data over the devices that divide "
        "the batch; for tp, model over all devices)",
    )
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="a multi-process run: process 0's address, the same for every process (also "
        "JAX_COORDINATOR_ADDRESS; left out on SLURM, Open MPI and TPU slices, which JAX detects)",
    )
    p.add_argument("--num-processes", type=AT_LEAST_1, help="processes in a multi-process run")
    p.add_argument("--process-id", type=int, help="this process's number, 0 to --num-processes - 1")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run set up by the cluster (SLURM, Open MPI, TPU slice) or by "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID",
    )
    p.add_argument(
        "--start-context",
        default="Every effort moves you",
        help="prompt for the sample printed after each epoch (default: %(default)r)",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _given(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options written on the command line, as opposed to left at their defaults."""
    unset = object()  # argparse fills in defaults only where the namespace has no value yet
    blank = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    seen = vars(parser.parse_args(argv, namespace=blank))
    return {name for name, value in seen.items() if value is not unset and value is not None}


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    return _run(args, lambda: _train(args, _given(train_parser(), argv)))


def _run(args, command) -> int:
    """command(); an error or Ctrl-C ends it with a short message (a traceback with --debug)."""
    try:
        return command()
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(
            e, CommandError | checkpoint.CheckpointError | files.DataFileError | GGUFError
        ):
            print(f"error: {e}", file=sys.stderr)
        else:
            first_line = (str(e).splitlines() or [""])[0][:300]
            print(f"error: {type(e).__name__}: {first_line} (--debug shows where)", file=sys.stderr)
        return 1


def _train(args, given: set[str]) -> int:
    if args.distributed or args.coordinator or args.num_processes or args.process_id is not None:
        parallel.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.text:
        args.text = str(Path(args.text).absolute())  # the run records where its text is
    ckpt_dir = Path(args.run_dir).absolute() / "checkpoints"
    kept = checkpoint.latest_step(ckpt_dir)
    if kept is not None and not args.resume:
        raise CommandError(
            f"{ckpt_dir} holds checkpoints: pass --resume to continue, or another --run-dir"
        )
    if args.resume and kept is None:
        print(f"nothing to resume in {ckpt_dir}: starting the run")
    saved_cfg = _take_saved_settings(args, given, ckpt_dir) if kept is not None else None
    text, path = _read_text(args.text)
    try:
        cfg = (
            saved_cfg or PRESETS[args.model].replace(context_length=args.context_length)
        ).replace(drop_rate=args.drop_rate, fused_attention=args.fused_attention)
    except ValueError as e:
        raise CommandError(f"bad model settings: {e}") from None
    try:
        train_loader, val_loader = train_val_loaders(
            text, cfg.context_length, args.batch_size, args.train_ratio, args.seed
        )
    except ValueError as e:
        raise CommandError(
            f"{path}: {e}; use a longer text, a smaller --context-length or another --train-ratio"
        ) from None
    if len(train_loader) == 0:
        raise CommandError(
            f"{path}: the training part has {train_loader.num_examples} windows of "
            f"{cfg.context_length} tokens, fewer than one batch: lower --batch-size"
        )
    total_steps = args.epochs * len(train_loader)
    warmup_steps = int(args.warmup * total_steps)
    lr = warmup_cosine_schedule(args.lr, total_steps, warmup_steps) if warmup_steps else args.lr
    tx = make_optimizer(
        lr, args.weight_decay, max_grad_norm=args.max_grad_norm, clip_from_step=warmup_steps
    )
    k_init, k_train = jax.random.split(jax.random.key(args.seed))
    mesh = _train_mesh(args)
    state = parallel.init_sharded(
        lambda: init_train_state(models.init_params(k_init, cfg), tx), cfg, mesh, args.strategy
    )
    history = None
    if kept is not None:
        state, history = resume(ckpt_dir, state, cfg)
        if args.epochs <= history.epochs_done:
            raise CommandError(
                f"the run has trained {history.epochs_done} epochs: pass --epochs above "
                f"{history.epochs_done} to train more"
            )
        print(f"resuming after epoch {history.epochs_done} (step {int(state.step)})")
    print(f"{path}: {len(text):,} characters; {len(train_loader)} batches per epoch; {cfg}")
    print(
        f"{args.strategy} on a mesh of {dict(mesh.shape)} over {mesh.size} of {len(jax.devices())} "
        f"{jax.default_backend()} devices in {jax.process_count()} process(es)"
    )
    tokenizer = gpt2_tokenizer()
    options = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    try:
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
            meta={"options": options, "tokenizer": "gpt2"},
            sample_fn=lambda p: sample_text(p, tokenizer, args.start_context, cfg),
            mesh=mesh,
            strategy=args.strategy,
            loss=mixed_precision(partial(loss_fn, cfg=cfg)) if args.bf16 else None,
        )
    except KeyboardInterrupt:
        print(_interrupted(ckpt_dir, args.run_dir), file=sys.stderr)
        return 130
    if jax.process_index() > 0:
        return 0  # process 0 plots and reports
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


def _train_mesh(args):
    """The device mesh that --mesh and --strategy ask for."""
    sizes = args.mesh or {}
    if "tp" in args.strategy and not sizes:
        if args.strategy != "tp":
            raise CommandError(f"--strategy {args.strategy} needs a --mesh, e.g. data=4,model=2")
        sizes = {"data": 1, "model": len(jax.devices())}
    try:
        return parallel.make_mesh(args.batch_size, **sizes)
    except ValueError as e:
        raise CommandError(f"--mesh: {e}") from None


def _take_saved_settings(args, given: set[str], ckpt_dir: Path):
    """The saved run's config; args not given on the command line take the run's saved values.
    Options that contradict the run's architecture are refused, by name."""
    _, meta = checkpoint.read_meta(ckpt_dir)
    cfg, saved = meta["config"], meta.get("options", {})
    clashes = []
    if "context_length" in given and args.context_length != cfg.context_length:
        clashes.append(
            f"--context-length {args.context_length} (the run's is {cfg.context_length})"
        )
    preset = PRESETS[args.model].replace(context_length=cfg.context_length)
    if "model" in given and not preset.same_weights_as(cfg):
        clashes.append(f"--model {args.model} (the run's is {saved.get('model', cfg)})")
    if clashes:
        raise CommandError(
            f"{ckpt_dir} holds another model than {' and '.join(clashes)}: leave those options "
            "out to resume, or train into another --run-dir"
        )
    for name, value in saved.items():
        if name not in given:
            setattr(args, name, value)
        elif getattr(args, name) != value and name not in ("model", "context_length", "epochs"):
            flag = f"--{name.replace('_', '-')}"
            print(f"changed from the saved run: {flag} {getattr(args, name)} (was {value})")
    return cfg


def _read_text(name: str | None) -> tuple[str, Path]:
    path = Path(name) if name else files.resolve("the-verdict.txt")
    if not path.is_file():
        raise CommandError(f"no text file {path}")
    try:
        return path.read_text(encoding="utf-8"), path
    except UnicodeDecodeError as e:
        raise CommandError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at position {e.start}): "
            "save it as UTF-8"
        ) from None


def _interrupted(ckpt_dir: Path, run_dir: str) -> str:
    kept = checkpoint.latest_step(ckpt_dir)
    if kept is None:
        return "interrupted before the first epoch ended: nothing was saved"
    return (
        f"interrupted: epoch {kept} is kept in {ckpt_dir} (the epoch under way is not); "
        f"continue with: python -m gptflax train --run-dir {run_dir} --resume"
    )


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax generate",
        usage="%(prog)s PROMPT | --chat MESSAGE, and --model NAME | --checkpoint DIR "
        "[options]  (--help lists them)",
        description="Continue a prompt with a model by name (OpenAI's GPT-2, SmolLM2-135M-"
        "Instruct, Gemma 3 270M, ...) or a trained one (a checkpoint folder written by "
        "`python -m gptflax train`), or chat with a chat model (--chat). Temperature 0 is "
        "greedy; above 0 it samples (Book §5.3), optionally from the top-k tokens only.",
    )
    p.add_argument("prompt", nargs="?", help="the text to continue")
    p.add_argument("--chat", metavar="MESSAGE", help="a user message to answer (chat models)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        help="a run's checkpoint folder (runs/NAME/checkpoints, or "
        "runs/NAME): its latest checkpoint",
    )
    src.add_argument(
        "--model", choices=sources.MODELS, metavar="NAME",
        help=f"a model by name: {', '.join(sources.MODELS)}",
    )  # fmt: skip
    p.add_argument(
        "-n",
        "--max-new-tokens",
        type=AT_LEAST_1,
        default=50,
        help="tokens to add at most (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=NOT_NEGATIVE,
        default=0.0,
        help="0: greedy; above 0: sample (default: %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=AT_LEAST_1,
        default=None,
        help="sample from the k likeliest tokens (1 to the vocabulary size; default: from all)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=123,
        help="sampling seed: same seed, same text (default: %(default)s)",
    )
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.chat is None):
        parser.error("give a prompt to continue or --chat MESSAGE, not both and not neither")
    if not (args.chat if args.prompt is None else args.prompt).strip():
        parser.error("the prompt is empty: give some text to continue")
    return _run(args, lambda: _generate(parser, args))


def _generate(parser: argparse.ArgumentParser, args) -> int:
    _, cfg, params, tokenizer, _ = _load_for_generation(args)
    if args.top_k is not None and args.top_k > cfg.vocab_size:
        parser.error(f"argument --top-k: must be at most the vocabulary size, {cfg.vocab_size}")
    if args.chat is not None:
        if tokenizer.chat is None:
            raise CommandError(
                "--chat needs a chat model (--model smollm2-135m-instruct, or a checkpoint of one)"
            )
        return _chat(args, cfg, params, tokenizer)
    ids = tokenizer.encode(args.prompt, allowed_special="all", bos=True)
    if len(ids) >= cfg.context_length:
        raise CommandError(
            f"the prompt has {len(ids)} tokens; this model's context holds "
            f"{cfg.context_length}: shorten the prompt"
        )
    eos = None if args.no_eos else tokenizer.eos_id
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


def _load_for_generation(args) -> sources.Model:
    if args.model:
        return sources.load_model(args.model)
    folder = Path(args.checkpoint)
    step = checkpoint.latest_step(folder)
    if step is None and (in_run := checkpoint.latest_step(folder / "checkpoints")) is not None:
        folder, step = folder / "checkpoints", in_run  # a run folder: its checkpoints
    if step is not None:
        print(f"loading checkpoint {folder / str(step)}", file=sys.stderr)
    return sources.load_checkpoint_model(folder, step)


def _chat(args, cfg, params, tokenizer) -> int:
    messages = [{"role": "user", "content": args.chat}]
    if (n := len(tokenizer.encode_chat(messages))) >= cfg.context_length:
        raise CommandError(
            f"the chat has {n} tokens; this model's context holds {cfg.context_length}"
        )
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
