"""`make notebooks`: every lab becomes a notebook with the script's cells, after a setup cell."""

import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "labs"))
import notebooks  # noqa: E402

pytestmark = pytest.mark.lab2


def test_each_lab_notebook_holds_the_scripts_cells(tmp_path):
    assert notebooks.main(tmp_path / "notebooks") == 0
    scripts = notebooks.lab_scripts()
    assert len(scripts) >= 13 and {s.stem for s in scripts} >= {"lab2_text_data", "labA_jax_primer"}
    for script in scripts:
        path = tmp_path / "notebooks" / f"{script.stem}.ipynb"
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        setup, *cells = notebook.cells
        assert setup.metadata["tags"] == ["setup"] and "os.chdir" in setup.source
        expected = jupytext.read(script, fmt="py:percent").cells
        assert [(c.cell_type, c.source) for c in cells] == [
            (c.cell_type, c.source) for c in expected
        ]
        assert sum(c.cell_type == "code" for c in cells) >= 5, script  # cells, not one block
