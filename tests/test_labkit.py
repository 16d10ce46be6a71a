"""labs/labkit.py: the starting model of the fine-tuning labs, as a typed value."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gptflax import checkpoint, files, models, nn, sources
from gptflax.tokenizer import gpt2_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "labs"))
import labkit  # noqa: E402

pytestmark = pytest.mark.lab6


@pytest.fixture
def no_gpt2(tmp_path, monkeypatch):
    """Data resolution that finds no GPT-2 weights: an empty cache and mirror. GPT-2's tokenizer
    (from the real mirror) is built first; the loaders hand it out with the model."""
    gpt2_tokenizer()
    monkeypatch.setenv("GPTFLAX_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTFLAX_MIRROR", str(tmp_path / "mirror"))


def test_starting_model_falls_back_from_gpt2_to_a_checkpoint_to_fresh_weights(
    tmp_path, no_gpt2, small_cfg
):
    start = labkit.starting_model(("124M",), tmp_path / "ckpt", small_cfg, smollm2=False)
    assert start.kind == "fresh" and "no checkpoint in" in start.about
    assert start.cfg == small_cfg.replace(drop_rate=0.0) and start.gpt2_size is None
    assert nn.count_params(start.params) == nn.count_params(
        models.init_params(jax.random.key(0), small_cfg)
    )

    saved_cfg = small_cfg.replace(drop_rate=0.1)
    saved = models.init_params(jax.random.key(5), saved_cfg)
    checkpoint.save_checkpoint(tmp_path / "ckpt", 3, saved, cfg=saved_cfg)
    start = labkit.starting_model(("124M",), tmp_path / "ckpt", small_cfg, smollm2=False)
    assert start.kind == "checkpoint" and start.about == f"the checkpoint in {tmp_path / 'ckpt'}"
    assert start.cfg == saved_cfg.replace(drop_rate=0.0)  # fine-tuning runs without dropout
    jax.tree.map(np.testing.assert_array_equal, start.params, saved)


def test_quick_runs_write_under_runs_quick(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(labkit, "QUICK", True)
    assert labkit.run_dir("lab9") == str(Path("runs", "quick", "lab9"))
    monkeypatch.setattr(labkit, "QUICK", False)
    assert labkit.run_dir("lab9") == str(Path("runs", "lab9"))
    assert (tmp_path / "runs" / "quick" / "lab9").is_dir() and (tmp_path / "runs" / "lab9").is_dir()


def test_smollm2_comes_after_gpt2_and_before_a_checkpoint(
    tmp_path, monkeypatch, no_gpt2, small_cfg, smollm2
):
    saved = models.init_params(jax.random.key(5), small_cfg)
    checkpoint.save_checkpoint(tmp_path / "ckpt", 1, saved, cfg=small_cfg)
    start = labkit.starting_model(("124M",), tmp_path / "ckpt", fresh_cfg=small_cfg)
    assert start.kind == "smollm2" and start.params is smollm2[1] and start.cfg is smollm2[0]
    assert (
        start.tokenizer is sources.load_tokenizer("smollm2") and start.tokenizer_name == "smollm2"
    )
    assert "SmolLM2-135M-Instruct" in start.about
    assert start.read_at == 2  # its spam classifier reads the last real token, before <|im_end|>

    start = labkit.starting_model(("124M",), tmp_path / "ckpt", small_cfg, smollm2=False)
    assert start.kind == "checkpoint" and start.tokenizer is gpt2_tokenizer()
    assert start.read_at is None  # the book's last position

    def without_smollm2(name, *args):
        if name == "smollm2-135m-instruct":
            raise files.DataFileError("SmolLM2-135M-Instruct.Q4_1.gguf: no copy found")
        return real_load(name, *args)

    real_load = sources.load_model
    monkeypatch.setattr(sources, "load_model", without_smollm2)
    start = labkit.starting_model(("124M",), tmp_path / "ckpt", fresh_cfg=small_cfg)
    assert start.kind == "checkpoint" and start.cfg == small_cfg
