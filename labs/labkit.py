"""What the labs share beside the library: quick mode, run folders, and the model to start from.

`GPTFLAX_QUICK=1` runs a lab's quick variant (tiny models, few steps: what the tests run); its
outputs go under runs/quick/, so a quick run never touches a full run's checkpoints or plots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import jax

from gptflax import checkpoint, files, models, nn, sources
from gptflax.config import GPT_CONFIG_124M

QUICK = os.environ.get("GPTFLAX_QUICK") == "1"


def run_dir(lab: str) -> str:
    """The lab's output folder, created: runs/<lab>, or runs/quick/<lab> in quick mode."""
    path = os.path.join("runs", "quick", lab) if QUICK else os.path.join("runs", lab)
    os.makedirs(path, exist_ok=True)
    return path


class Start(NamedTuple):
    """The model a fine-tuning lab starts from, where it came from, and its tokenizer."""

    kind: str  # "gpt2", "smollm2", "checkpoint" or "fresh": the labs' settings follow it
    about: str  # one line for people, e.g. "OpenAI's GPT-2 124M"
    cfg: object
    params: dict
    tokenizer: object
    tokenizer_name: str  # its name in gptflax.sources.TOKENIZERS, for the checkpoints saved
    gpt2_size: str | None = None

    @property
    def read_at(self) -> int | None:
        """Where the spam classifiers (labs 6, E) read a prediction: None for the book's last
        position, or the padding id for each text's last real token (SmolLM2's choice: it learns
        to carry the text to the last position slowly)."""
        return self.tokenizer.eos_id if self.kind == "smollm2" else None


FRESH_CFG = GPT_CONFIG_124M.replace(context_length=256)  # lab 5's model when none was saved


def starting_model(
    gpt2_sizes: tuple[str, ...] = ("124M",),
    checkpoint_dir: str | Path | None = None,
    fresh_cfg=FRESH_CFG,
    smollm2: bool = True,
) -> Start:
    """The first that exists of: OpenAI's GPT-2 in `gpt2_sizes` order, SmolLM2-135M-Instruct
    (with `smollm2`), the latest checkpoint in `checkpoint_dir` (e.g. lab 5's model), fresh
    random params of `fresh_cfg`. Dropout is off: the book fine-tunes without it."""
    for size in gpt2_sizes:
        try:
            m = sources.load_model(f"gpt2-{size.lower()}")
        except files.DataFileError as e:
            print(f"GPT-2 {size} weights not available: {str(e).splitlines()[0]}")
            continue
        about = f"OpenAI's GPT-2 {size}"
        return Start(
            "gpt2", about, no_dropout(m.cfg), m.params, m.tokenizer, m.tokenizer_name, size
        )
    if smollm2:
        try:
            m = sources.load_model("smollm2-135m-instruct")
        except files.DataFileError as e:
            print(f"SmolLM2 weights not available: {str(e).splitlines()[0]}")
        else:
            about = "SmolLM2-135M-Instruct (a Llama; GPT-2's weights are absent)"
            return Start("smollm2", about, m.cfg, m.params, m.tokenizer, m.tokenizer_name)
    if checkpoint_dir is not None and checkpoint.latest_step(checkpoint_dir) is not None:
        m = sources.load_checkpoint_model(checkpoint_dir)
        about = f"the checkpoint in {checkpoint_dir}"
        return Start(
            "checkpoint", about, no_dropout(m.cfg), m.params, m.tokenizer, m.tokenizer_name
        )
    params = models.init_params(jax.random.key(123), fresh_cfg)
    about = f"fresh random weights ({nn.count_params(params):,} parameters)"
    if checkpoint_dir is not None:
        about += f"; no checkpoint in {checkpoint_dir} (run its lab first for a pretrained one)"
    return Start(
        "fresh", about, no_dropout(fresh_cfg), params, sources.load_tokenizer("gpt2"), "gpt2"
    )


def no_dropout(cfg):
    """The config with dropout off, for a family that has dropout (the GPT)."""
    return cfg.replace(drop_rate=0.0) if hasattr(cfg, "drop_rate") else cfg
