"""Command lines: `python -m gptflax COMMAND` (`--help` lists the commands). Each only parses its
options into the library's objects and reports errors: a bad option ends with exit status 2 and a
two-line usage error, a bad input found later with status 1 and one line starting `error:`
(`--debug` shows the traceback)."""

from __future__ import annotations

import sys

from gptflax.memory import keep_freed_memory

keep_freed_memory()  # before JAX allocates: a 124M train step 2.36 -> 2.19 s (batch 2, this CPU)

from gptflax.cli.download import download_main  # noqa: E402
from gptflax.cli.eval import eval_main  # noqa: E402
from gptflax.cli.generate import chat_main, generate_main  # noqa: E402
from gptflax.cli.prepare import prepare_main  # noqa: E402
from gptflax.cli.serve import serve_main  # noqa: E402
from gptflax.cli.train import train_main  # noqa: E402

COMMANDS = {
    "prepare": (prepare_main, "tokenize text files once into token files, for train --data"),
    "train": (train_main, "pretrain a model on a text file or token files (chapter 5), or resume"),
    "generate": (generate_main, "continue a prompt, or answer one chat message"),
    "chat": (chat_main, "chat with a chat model, turn after turn"),
    "download": (download_main, "download the files that models read, to use them offline"),
    "serve": (serve_main, "serve a model over an OpenAI-compatible HTTP API, with a chat page"),
    "eval": (eval_main, "score a model on benchmarks (HellaSwag, ARC, PIQA, MMLU), offline"),
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


__all__ = [
    "COMMANDS", "chat_main", "download_main", "eval_main", "generate_main", "main",
    "prepare_main", "train_main",
]  # fmt: skip
