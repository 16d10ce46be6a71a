"""`python -m gptflax prepare SOURCES... --out DIR`: tokenize text files once into token files
that `python -m gptflax train --data DIR` streams (gptflax.tokenfiles)."""

from __future__ import annotations

import argparse

from gptflax.cli.common import number, run_command
from gptflax.sources import TOKENIZERS
from gptflax.tokenfiles import prepare


def prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax prepare",
        description="Tokenize UTF-8 text files (folders: every file under them; each file is a "
        "document) into token files and a manifest in --out, in parallel processes. The last "
        "--val-share of each document is held out for validation. Run it again after the "
        "sources change: unchanged sources are not tokenized again.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="text files or folders")
    p.add_argument("--out", required=True, help="the folder for the token files")
    p.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS,
                   help="the tokenizer of the model to train (default: %(default)s)")  # fmt: skip
    p.add_argument("--val-share", type=number("float"), default=0.05,
                   help="share of each document held out (default: %(default)s)")  # fmt: skip
    p.add_argument("--workers", type=number("int"), default=None,
                   help="tokenizing processes (default: one per CPU core for more than 16 MB of "
                   "text, else 1)")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def prepare_main(argv: list[str] | None = None) -> int:
    args = prepare_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        prepare_parser().error(f"argument --workers: must be at least 1, got {args.workers}")
    return run_command(args, lambda: _prepare(args))


def _prepare(args) -> int:
    prepare(args.sources, args.out, tokenizer=args.tokenizer, val_share=args.val_share,
            workers=args.workers)  # fmt: skip
    return 0
