"""`python -m gptflax COMMAND ...`: `python -m gptflax --help` lists the commands."""

from gptflax.cli import main

raise SystemExit(main())
