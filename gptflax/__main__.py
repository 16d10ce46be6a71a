"""`python -m gptflax COMMAND ...` (`--help` lists the commands), and the installed scripts:
`gptflax COMMAND ...`, or `gptflax-train ...` and its like for one command."""

import sys
from pathlib import Path

from gptflax.memory import with_huge_pages


def run() -> int:
    """Run the command line on huge pages: the process runs again at once, before JAX is imported,
    its heap on 2 MB pages (`gptflax.memory`). A script named gptflax-NAME runs command NAME."""
    with_huge_pages()
    from gptflax.cli import main

    command = Path(sys.argv[0]).name.partition("gptflax-")[2]
    return main([command, *sys.argv[1:]] if command else None)


if __name__ == "__main__":
    raise SystemExit(run())
