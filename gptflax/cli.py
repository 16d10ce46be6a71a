"""Command lines: `python -m gptflax COMMAND` (`--help` lists the commands). Each only parses its
options into the library's objects and reports errors: a bad option ends with exit status 2 and a
two-line usage error, a bad input found later with status 1 and one line starting `error:`
(`--debug` shows the traceback), a stopped run with 130 (Ctrl-C) or 143 (SIGTERM)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax

from gptflax import checkpoint, files, parallel, sources
from gptflax.generate import chat, generate, trim_at_eos
from gptflax.gguf import GGUFError
from gptflax.training.run import Run, RunError, pretrain, resume_run

STOPPED_STATUS = {"SIGINT": 130, "SIGTERM": 143}
DEFAULTS = Run()


class CommandError(Exception):
    """A bad input found after the options were parsed: reported in one line, exit status 1."""


def run_command(args, command) -> int:
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
        known = (CommandError, RunError, checkpoint.CheckpointError, files.DataFileError, GGUFError)
        if isinstance(e, known):
            print(f"error: {e}", file=sys.stderr)
        else:
            first_line = (str(e).splitlines() or [""])[0][:300]
            print(f"error: {type(e).__name__}: {first_line} (--debug shows where)", file=sys.stderr)
        return 1


def flag(name: str) -> str:
    """The command-line flag of a Run field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


# --- train ----------------------------------------------------------------------------------------

# Every Run field is an option; argparse only converts the text, Run checks the value.
TRAIN_HELP = {
    "data": "a UTF-8 text file to train on (default: the book's the-verdict.txt)",
    "train_ratio": "share of the text's characters to train on; the rest validates",
    "model": "the architecture to train from scratch: GPT-2's 124M (the book's), 355M, 774M or "
    "1558M, tiny (2 layers of width 32, trains in seconds on a CPU: for trying things out), "
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
    "batch_size": "windows per step",
    "eval_freq": "evaluate every N steps",
    "eval_iter": "batches per evaluation",
    "start_context": "prompt of the sample printed after each epoch",
    "checkpoint_every": "save a checkpoint every N steps (default: at each epoch's end); one is "
    "also saved at the end and when the run is stopped",
    "keep": "how many of the newest checkpoints to keep",
    "bf16": "bf16 compute, float32 master weights",
    "fused_attention": "jax.nn.dot_product_attention (cuDNN flash attention on GPUs); needs "
    "--drop-rate 0",
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
        usage="%(prog)s [TEXT] [options]  (--help lists them)",
        description="Pretrain a model on a text file, as chapter 5 does (the defaults are the "
        "book's settings). Checkpoints and the loss plot go to --run-dir; --resume continues "
        "its latest checkpoint with the run's saved settings, changed only where you give an "
        "option.",
    )
    for f in dataclasses.fields(Run):
        default, kind = getattr(DEFAULTS, f.name), f.type.split(" |")[0]
        shown = "" if default is None else f" (default: {default})"
        if f.name == "data":
            p.add_argument("data", nargs="?", metavar="TEXT", help=TRAIN_HELP[f.name])
        elif kind == "bool":
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                           help=TRAIN_HELP[f.name] + shown)  # fmt: skip
        else:
            p.add_argument(flag(f.name), type=_number(kind), default=None,
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


def _number(kind: str):
    """An argparse type that converts the text (Run checks the value)."""
    if kind not in ("int", "float"):
        return str

    def parse(text: str):
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind == 'int' else 'number'}"
            ) from None

    return parse


def train_main(argv: list[str] | None = None) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
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


def add_process_options(p: argparse.ArgumentParser) -> None:
    """Options that join a multi-process run."""
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="a multi-process run: process 0's address, the same for every process (also "
        "JAX_COORDINATOR_ADDRESS; left out on SLURM, Open MPI and TPU slices, which JAX detects)",
    )
    p.add_argument("--num-processes", type=int, help="processes in a multi-process run")
    p.add_argument("--process-id", type=int, help="this process's number, 0 to --num-processes - 1")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run set up by the cluster (SLURM, Open MPI, TPU slice) or by "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID",
    )


def start_processes(args) -> None:
    """Join a multi-process run when the options ask for one (before any other JAX call)."""
    if args.distributed or args.coordinator or args.num_processes or args.process_id is not None:
        parallel.initialize(args.coordinator, args.num_processes, args.process_id)


# --- generate -------------------------------------------------------------------------------------


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax generate",
        usage="%(prog)s PROMPT | --chat MESSAGE, and --model NAME | --checkpoint DIR "
        "[options]  (--help lists them)",
        description="Continue a prompt with a model by name (OpenAI's GPT-2, SmolLM2-135M-"
        "Instruct, Gemma 3 270M, ...) or a trained one (a checkpoint folder written by "
        "`python -m gptflax train`), or answer one chat message (--chat). Temperature 0 is "
        "greedy; above 0 it samples (Book §5.3), optionally from the top-k tokens only.",
    )
    p.add_argument("prompt", nargs="?", help="the text to continue")
    p.add_argument("--chat", metavar="MESSAGE", help="a user message to answer (chat models)")
    add_model_options(p)
    p.add_argument("-n", "--max-new-tokens", type=positive, default=50,
                   help="tokens to add at most (default: %(default)s)")  # fmt: skip
    add_sampling_options(p)
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def positive(text: str) -> int:
    value = _number("int")(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def not_negative(text: str) -> float:
    value = _number("float")(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=sources.MODELS, metavar="NAME",
                     help=f"a model by name: {', '.join(sources.MODELS)}")  # fmt: skip
    src.add_argument("--checkpoint", help="a run's checkpoint folder (runs/NAME/checkpoints, or "
                     "runs/NAME): its latest checkpoint")  # fmt: skip


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=not_negative, default=0.0,
                   help="0: greedy; above 0: sample (default: %(default)s)")  # fmt: skip
    p.add_argument("--top-k", type=positive, default=None,
                   help="sample from the k likeliest tokens (1 to the vocabulary size; default: "
                   "from all)")  # fmt: skip
    p.add_argument("--seed", type=int, default=123,
                   help="sampling seed: same seed, same text (default: %(default)s)")  # fmt: skip


def generate_main(argv: list[str] | None = None) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.chat is None):
        parser.error("give a prompt to continue or --chat MESSAGE, not both and not neither")
    if not (args.chat if args.prompt is None else args.prompt).strip():
        parser.error("the prompt is empty: give some text to continue")
    return run_command(args, lambda: _generate(parser, args))


def _generate(parser: argparse.ArgumentParser, args) -> int:
    _, cfg, params, tokenizer, _ = load_for_generation(args)
    if args.top_k is not None and args.top_k > cfg.vocab_size:
        parser.error(f"argument --top-k: must be at most the vocabulary size, {cfg.vocab_size}")
    key = jax.random.key(args.seed)
    if args.chat is not None:
        if tokenizer.chat is None:
            raise CommandError(
                "--chat needs a chat model (--model smollm2-135m-instruct, or a checkpoint of one)"
            )
        messages = [{"role": "user", "content": args.chat}]
        if (n := len(tokenizer.encode_chat(messages))) >= cfg.context_length:
            raise CommandError(
                f"the chat has {n} tokens; this model's context holds {cfg.context_length}"
            )
        decoding = dict(temperature=args.temperature, top_k=args.top_k, key=key)
        print(chat(params, cfg, tokenizer, messages, args.max_new_tokens, **decoding))
        return 0
    ids = tokenizer.encode(args.prompt, allowed_special="all", bos=True)
    if len(ids) >= cfg.context_length:
        raise CommandError(
            f"the prompt has {len(ids)} tokens; this model's context holds "
            f"{cfg.context_length}: shorten the prompt"
        )
    eos = None if args.no_eos else tokenizer.eos_id
    out = generate(params, [ids], args.max_new_tokens, cfg, temperature=args.temperature,
                   top_k=args.top_k, eos_id=eos, key=key)  # fmt: skip
    new = trim_at_eos(out[0][len(ids) :], eos) if eos is not None else out[0][len(ids) :]
    print(args.prompt + tokenizer.decode([int(i) for i in new]))
    return 0


def load_for_generation(args) -> sources.Model:
    """The model that --model or --checkpoint names (a run folder: its checkpoints)."""
    if args.model:
        return sources.load_model(args.model)
    folder = Path(args.checkpoint)
    step = checkpoint.latest_step(folder)
    if step is None and (in_run := checkpoint.latest_step(folder / "checkpoints")) is not None:
        folder, step = folder / "checkpoints", in_run  # a run folder: its checkpoints
    if step is not None:
        print(f"loading checkpoint {folder / str(step)}", file=sys.stderr)
    return sources.load_checkpoint_model(folder, step)


# --- python -m gptflax ----------------------------------------------------------------------------

COMMANDS = {
    "train": (train_main, "pretrain a model on a text file (chapter 5), or resume a run"),
    "generate": (generate_main, "continue a prompt, or answer one chat message"),
}


def main(argv: list[str] | None = None) -> int:
    """`python -m gptflax COMMAND ...`: run one of COMMANDS with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    lines = [f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items()]
    text = "usage: python -m gptflax COMMAND [--help]\n\ncommands:\n" + "\n".join(lines)
    if argv in ([], ["-h"], ["--help"]):
        print(text + "\n\n`python -m gptflax COMMAND --help` explains a command's options.")
        return 0
    print(f"{text}\n\nerror: unknown command {argv[0]!r}", file=sys.stderr)
    return 2
