"""`python -m gptflax COMMAND ...`: `python -m gptflax --help` lists the commands."""

from gptflax.memory import with_huge_pages

with_huge_pages()  # the command runs again at once, its heap on huge pages (gptflax.memory)

from gptflax.cli import main  # noqa: E402

raise SystemExit(main())
