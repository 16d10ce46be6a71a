"""Every lab runs top to bottom in quick mode and passes its own checks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

LAB_DIR = Path(__file__).resolve().parents[1] / "labs"


def run_lab(name: str, cwd: Path) -> str:
    """Run a lab in quick mode inside `cwd`, so its runs/ outputs stay out of the checkout."""
    (script,) = LAB_DIR.glob(f"lab{name}_*.py")
    env = {**os.environ, "GPTFLAX_QUICK": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


# The labs in reading order, as the Makefile's LAB_ORDER.
LABS = ["A", "2", "bpe", "3", "4", "attention", "5", "pretrain", "speed", "llama", "gemma3",
        "qwen", "6", "7", "dpo", "D", "E", "design"]  # fmt: skip


# Labs that hold a real model of 0.5B parameters or more in fp32 (about 7 GB): `make test` runs
# them, and the parity tests against transformers, one at a time after the rest.
BIG_MODELS = {"gemma3", "qwen"}


def lab_param(name: str):
    marks = [getattr(pytest.mark, f"lab{name}")]
    if name in BIG_MODELS:
        marks.append(pytest.mark.big_models)
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [lab_param(n) for n in LABS])
def test_lab_runs_and_passes_its_checks(name, tmp_path):
    last_line = run_lab(name, tmp_path).rstrip().splitlines()[-1]
    assert last_line.startswith(f"lab {name}: all checks passed"), last_line
    assert not (tmp_path / "runs" / f"lab{name}").exists()  # a full run's outputs stay untouched
