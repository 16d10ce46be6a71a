"""What the commands share: the error reporting, option types, and the options that choose a
model, how it samples, and how processes join a multi-process run."""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from pathlib import Path

from gptflax import checkpoint, files, parallel, sources
from gptflax.gguf import GGUFError
from gptflax.streaming import Sampling
from gptflax.tokenfiles import TokenFilesError
from gptflax.training.run import RunError


class CommandError(Exception):
    """A bad input found after the options were parsed: reported in one line, exit status 1."""


REPORTED = (CommandError, RunError, checkpoint.CheckpointError, files.DataFileError, GGUFError,
            TokenFilesError)  # fmt: skip


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
        if isinstance(e, REPORTED):
            print(f"error: {e}", file=sys.stderr)
        else:
            first_line = (str(e).splitlines() or [""])[0][:300]
            print(f"error: {type(e).__name__}: {first_line} (--debug shows where)", file=sys.stderr)
        return 1


def flag(name: str) -> str:
    """The command-line flag of a setting: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def number(kind: str):
    """An argparse type that converts the text to an int or a float (the library checks it)."""

    def parse(text: str):
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind == 'int' else 'number'}"
            ) from None

    return parse


def ranged(kind: str, ok, what: str):
    """An argparse type: the text as an int or a finite float, accepted when ok(value)."""

    def parse(text: str):
        value = number(kind)(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


POSITIVE = ranged("int", lambda v: v >= 1, "at least 1")


def add_model_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=sources.MODELS, metavar="NAME",
                     help=f"a model by name: {', '.join(sources.MODELS)}")  # fmt: skip
    src.add_argument("--checkpoint", help="a run's checkpoint folder (runs/NAME/checkpoints, or "
                     "runs/NAME): its latest checkpoint")  # fmt: skip


def load_model(args) -> sources.Model:
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


def add_sampling_options(p: argparse.ArgumentParser, defaults: Sampling, seed: int) -> None:
    """--temperature, --top-k, --top-p, --repetition-penalty and --seed, with these defaults."""
    p.add_argument("--temperature", type=ranged("float", lambda v: v >= 0, "0 or more"),
                   default=defaults.temperature,
                   help="0: greedy; above 0: sample (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--top-k",
        type=POSITIVE,
        default=defaults.top_k,
        help="sample from the k likeliest tokens only (1 to the vocabulary size)",
    )
    p.add_argument("--top-p", type=ranged("float", lambda v: 0 < v <= 1, "in (0, 1]"),
                   default=defaults.top_p, help="sample from the likeliest tokens whose "
                   "probabilities add up to this (default: %(default)s)")  # fmt: skip
    p.add_argument("--repetition-penalty", type=ranged("float", lambda v: v > 0, "above 0"),
                   default=defaults.repetition_penalty,
                   help="above 1 makes tokens already in the text less likely (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=seed,
                   help="sampling seed: same seed, same text (default: %(default)s)")  # fmt: skip


def sampling_of(args, parser: argparse.ArgumentParser, vocab_size: int) -> Sampling:
    if args.top_k is not None and args.top_k > vocab_size:
        parser.error(f"argument --top-k: must be at most the vocabulary size, {vocab_size}")
    return Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)


def add_process_options(p: argparse.ArgumentParser) -> None:
    """Options that join a multi-process run."""
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="a multi-process run: process 0's address, the same for every process (also "
        "JAX_COORDINATOR_ADDRESS; left out on SLURM, Open MPI and TPU slices, which JAX detects)",
    )
    p.add_argument("--num-processes", type=POSITIVE, help="processes in a multi-process run")
    p.add_argument("--process-id", type=ranged("int", lambda v: v >= 0, "0 or more"),
                   help="this process's number, 0 to --num-processes - 1")  # fmt: skip
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run set up by the cluster (SLURM, Open MPI, TPU slice) or by "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID",
    )
    p.add_argument(
        "--join-timeout",
        type=POSITIVE,
        default=300,
        metavar="SECONDS",
        help="how long the processes wait for each other (default: %(default)s)",
    )


def check_process_options(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors, in our flags' names, for a multi-process run that cannot start as asked."""
    named = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = args.num_processes or os.environ.get("JAX_NUM_PROCESSES")
    rank = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if (args.num_processes or args.process_id is not None) and not named:
        parser.error("--num-processes and --process-id need --coordinator HOST:PORT, process 0's "
                     "address, the same for every process")  # fmt: skip
    if args.coordinator and (count is None or rank is None):
        parser.error("--coordinator needs --num-processes N and --process-id I (0 to N - 1)")
    if count is not None and rank is not None and not 0 <= int(rank) < int(count):
        parser.error(f"--process-id {rank} is not in 0 to {int(count) - 1} (--num-processes "
                     f"{count})")  # fmt: skip


def start_processes(args) -> None:
    """Join a multi-process run when the options ask for one (before any other JAX call). The
    processes wait --join-timeout seconds for each other, saying so; then the run ends with one
    line naming what did not answer (JAX's own timeout aborts with a C++ stack trace)."""
    if not (args.distributed or args.coordinator or args.num_processes
            or args.process_id is not None):  # fmt: skip
        return
    address = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "the cluster's")
    rank = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    joined = threading.Event()

    def give_up():
        if not joined.wait(args.join_timeout):
            if str(rank) == "0":
                what = f"not every process joined the coordinator at {address}"
                fix = "start the others with the same --coordinator and their --process-id"
            else:
                what = f"no coordinator answered at {address}"
                fix = "start process 0 (--process-id 0) there first, or check the address"
            print(f"error: {what} within {args.join_timeout} s: {fix}", file=sys.stderr,
                  flush=True)  # fmt: skip
            os._exit(1)

    print(f"waiting up to {args.join_timeout} s for the run's processes to join at {address}",
          file=sys.stderr, flush=True)  # fmt: skip
    threading.Thread(target=give_up, daemon=True).start()
    parallel.initialize(args.coordinator, args.num_processes, args.process_id,
                        timeout=args.join_timeout + 60)  # fmt: skip
    joined.set()
