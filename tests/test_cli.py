"""The command lines: train, resume, refuse to clobber a run, generate, and clear errors."""

import shutil
import subprocess
import sys

import pytest

from gptflax import checkpoint
from gptflax.cli import generate_main, train_main

pytestmark = pytest.mark.lab5

TINY_RUN = ["--model", "tiny", "--context-length", "32", "--batch-size", "8", "--eval-freq", "10"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert train_main([*TINY_RUN, "--epochs", "1", "--run-dir", str(run)]) == 0
    return run


def test_train_writes_checkpoints_and_a_plot(run_dir):
    assert checkpoint.latest_step(run_dir / "checkpoints") == 1
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_run_is_not_overwritten_without_resume(run_dir):
    with pytest.raises(SystemExit, match="pass --resume"):
        train_main([*TINY_RUN, "--epochs", "2", "--run-dir", str(run_dir)])
    assert checkpoint.latest_step(run_dir / "checkpoints") == 1


def test_resume_continues_from_the_last_epoch(run_dir, capsys, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    assert train_main([*TINY_RUN, "--epochs", "2", "--run-dir", str(resumed), "--resume"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert checkpoint.latest_step(resumed / "checkpoints") == 2


def test_generate_from_a_checkpoint(run_dir, capsys):
    argv = ["Every effort", "--checkpoint", str(run_dir / "checkpoints"), "--max-new-tokens", "5"]
    assert generate_main(argv) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("Every effort") and len(greedy) > len("Every effort\n")
    sampled = [*argv, "--temperature", "1.0", "--top-k", "5", "--seed", "7"]
    generate_main(sampled)
    first = capsys.readouterr().out
    generate_main(sampled)
    assert capsys.readouterr().out == first  # same seed, same text


def test_generate_errors_are_clear(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints")
    with pytest.raises(SystemExit, match="shorten the prompt"):
        generate_main(["word " * 40, "--checkpoint", ckpt])
    with pytest.raises(SystemExit, match="no checkpoint directory"):
        generate_main(["hi", "--checkpoint", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="put it at"):
        generate_main(["hi", "--gpt2", "124M"])


def test_a_text_too_short_for_the_context_is_a_clear_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(SystemExit, match="too few for max_length"):
        train_main([str(short), *TINY_RUN, "--run-dir", str(tmp_path / "r")])


def test_bf16_and_fused_attention_train_from_the_command_line(tmp_path, capsys):
    args = [*TINY_RUN, "--epochs", "1", "--drop-rate", "0", "--run-dir", str(tmp_path)]
    assert train_main([*args, "--bf16", "--fused-attention"]) == 0
    assert (tmp_path / "checkpoints" / "1").is_dir()
    with pytest.raises(SystemExit, match="fused_attention has no attention dropout"):
        train_main([*TINY_RUN, "--fused-attention", "--run-dir", str(tmp_path / "b")])


def test_python_m_gptflax_runs_the_commands(run_dir):
    def gptflax(*args):
        return subprocess.run(
            [sys.executable, "-m", "gptflax", *args], capture_output=True, text=True, timeout=300
        )

    out = gptflax("generate", "Every effort", "--checkpoint", str(run_dir / "checkpoints"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("Every effort") and len(out.stdout) > len("Every effort\n")
    usage = gptflax("fly")
    assert usage.returncode == 2 and "usage: python -m gptflax {train,generate}" in usage.stderr


@pytest.mark.slow
@pytest.mark.labllama
def test_chat_with_smollm2_from_the_command_line(capsys):
    question = "What is the capital of France?"
    assert generate_main(["--model", "smollm2", "--chat", question]) == 0
    assert capsys.readouterr().out == "The capital of France is Paris.\n"


def test_chat_needs_one_input_and_a_chat_model(run_dir, capsys):
    ckpt = str(run_dir / "checkpoints")
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error
        generate_main(["hi", "--chat", "hello", "--checkpoint", ckpt])
    assert "not both and not neither" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--chat needs a chat model"):
        generate_main(["--chat", "hello", "--checkpoint", ckpt])
