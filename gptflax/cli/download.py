"""`python -m gptflax download MODEL ...`: fetch the files that models read, once per machine."""

from __future__ import annotations

import argparse

from gptflax import sources
from gptflax.cli.common import run_command


def download_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax download",
        description="Download and verify the files the named models read (weights, tokenizers) "
        "into the cache, so that later runs work offline. Real models go to ~/.cache/gptflax "
        "($GPTFLAX_CACHE), shared by every checkout on this machine.",
    )
    p.add_argument("models", nargs="+", choices=sources.MODELS, metavar="MODEL",
                   help=f"models by name: {', '.join(sources.MODELS)}")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def download_main(argv: list[str] | None = None) -> int:
    args = download_parser().parse_args(argv)
    return run_command(args, lambda: _download(args.models))


def _download(names: list[str]) -> int:
    for name in names:
        paths = sources.download(name)
        print(f"{name}: " + (", ".join(str(p) for p in paths) or "nothing to download"))
    return 0
