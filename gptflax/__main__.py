"""`python -m gptflax train ...` and `python -m gptflax generate ...`."""

from gptflax.cli import main

raise SystemExit(main())
