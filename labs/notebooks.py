"""Write every lab as a Jupyter notebook (`make notebooks`): notebooks/<lab>.ipynb, the lab's
`# %%` cells as notebook cells (jupytext), after one setup cell that runs the notebook from the
repository's root, as `make lab-N` runs the script. The notebooks are not kept in git."""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
from nbformat.v4 import new_code_cell

ROOT = Path(__file__).resolve().parents[1]
SETUP = (
    "# Run from the repository's root, as `make lab-N` does: data, runs/ and labkit are there.\n"
    "import os, sys\n"
    "os.chdir(os.path.abspath('..'))\n"
    "sys.path.insert(0, 'labs')"
)


def lab_scripts() -> list[Path]:
    return sorted(ROOT.glob("labs/lab*_*.py"))


def notebook_of(script: Path):
    """The lab as a notebook: the setup cell, then its cells."""
    notebook = jupytext.read(script, fmt="py:percent")
    notebook.cells.insert(0, new_code_cell(SETUP, metadata={"tags": ["setup"]}))
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}  # fmt: skip
    return notebook


def main(folder: str | Path = ROOT / "notebooks") -> int:
    """Write the notebooks into `folder` (the repository's notebooks/, which is one level below
    the root, as the setup cell expects)."""
    out = Path(folder)
    out.mkdir(exist_ok=True)
    for script in lab_scripts():
        path = out / f"{script.stem}.ipynb"
        jupytext.write(notebook_of(script), path)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
