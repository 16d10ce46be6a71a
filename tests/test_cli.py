"""The command lines, driven as a user would: train, resume, generate, and every bad input ending
in a short message with exit status 2 (usage) or 1 (runtime), Ctrl-C in 130."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptflax import checkpoint
from gptflax.checkpoint import CheckpointError
from gptflax.cli import generate_main, train_main
from gptflax.data import train_val_loaders
from gptflax.generate import generate, trim_at_eos
from gptflax.tokenizer import EOT_ID, gpt2_tokenizer

pytestmark = pytest.mark.lab5

TINY_RUN = ["--model", "tiny", "--context-length", "32", "--batch-size", "8", "--eval-freq", "10"]
TINY_RUN += ["--mesh", "data=1"]  # one device, which compiles fastest (test_parallel shards)
COMMANDS = {"train": train_main, "generate": generate_main}


@pytest.fixture
def cli(capsys):
    """cli("train", *args) -> (exit status, stdout, stderr), as a shell would see them."""

    def run(command, *argv):
        capsys.readouterr()
        try:
            status = COMMANDS[command](list(argv))
        except SystemExit as e:  # argparse's usage errors
            status = e.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


def short_error(err: str, lines: int = 2) -> bool:
    """A message of at most `lines` lines, without a traceback."""
    return "Traceback" not in err and 0 < len(err.strip().splitlines()) <= lines


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert train_main([*TINY_RUN, "--epochs", "1", "--run-dir", str(run)]) == 0
    return run


def test_train_writes_checkpoints_and_a_plot(run_dir, verdict_text):
    assert len(train_val_loaders(verdict_text, 32, 8)[0]) == 18
    step, meta = checkpoint.read_meta(run_dir / "checkpoints")  # numbered by step
    assert meta["position"] == {"epoch": 1, "index": 0} and meta["history"]["epochs_done"] == 1
    assert step == 18  # the training part's 144 windows of 32 tokens, in batches of 8
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_run_is_not_overwritten_without_resume(run_dir, cli):
    before = checkpoint.complete_steps(run_dir / "checkpoints")
    status, _, err = cli("train", *TINY_RUN, "--epochs", "2", "--run-dir", str(run_dir))
    assert status == 1 and "holds checkpoints: resume the run" in err and short_error(err, 1)
    assert checkpoint.complete_steps(run_dir / "checkpoints") == before


def test_resume_takes_the_runs_settings_and_continues_it_exactly(run_dir, cli, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    status, out, _ = cli("train", "--run-dir", str(resumed), "--resume", "--epochs", "2")
    assert status == 0 and "resuming at step 18: epoch 2, batch 1" in out
    whole = tmp_path / "whole"
    assert cli("train", *TINY_RUN, "--epochs", "2", "--run-dir", str(whole))[0] == 0
    _, meta = checkpoint.read_meta(resumed / "checkpoints")
    _, uninterrupted = checkpoint.read_meta(whole / "checkpoints")
    assert meta["config"] == uninterrupted["config"] and meta["config"].context_length == 32
    assert meta["history"]["train_losses"] == uninterrupted["history"]["train_losses"]
    assert meta["history"]["val_losses"] == uninterrupted["history"]["val_losses"]


def test_the_books_own_test_of_its_training_script_records_39_evaluations(cli, tmp_path):
    # ch05/01_main-chapter-code/tests.py: context 12, emb 32, 4 heads, 2 layers, lr 5e-4, one
    # epoch at batch 2 (192 steps), evaluation every 5 steps on 1 batch: 39 points
    book = ["--context-length", "12", "--lr", "5e-4", "--eval-freq", "5", "--eval-iter", "1"]
    argv = ["--model", "tiny", *book, "--epochs", "1", "--batch-size", "2"]
    assert cli("train", *argv, "--run-dir", str(tmp_path))[0] == 0
    history = checkpoint.read_meta(tmp_path / "checkpoints")[1]["history"]
    assert len(history["train_losses"]) == len(history["val_losses"]) == 39
    assert len(history["tokens_seen"]) == 39 and history["steps"][-1] == 190


def test_resume_refuses_options_that_contradict_the_run_by_name(run_dir, cli):
    argv = ["--run-dir", str(run_dir), "--resume", "--epochs", "2"]
    status, _, err = cli("train", *argv, "--context-length", "64", "--model", "124M")
    assert status == 1 and short_error(err, 1)
    assert "model='124M' (the run's is 'tiny')" in err
    assert "context_length=64 (the run's is 32)" in err
    status, _, err = cli("train", "--run-dir", str(run_dir), "--resume", "--epochs", "1")
    assert status == 1 and "has taken all 18 steps of its 1 epochs: ask for more epochs" in err
    assert checkpoint.complete_steps(run_dir / "checkpoints") == [18]


def test_a_damaged_checkpoint_stops_resume_in_one_line(run_dir, cli, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    for f in (broken / "checkpoints" / "18" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)
    argv = ["--run-dir", str(broken), "--resume", "--epochs", "2"]
    status, _, err = cli("train", *argv)
    assert status == 1 and "damaged or incomplete" in err and short_error(err, 1)
    with pytest.raises(CheckpointError):  # --debug: the error itself, with its traceback
        train_main([*argv, "--debug"])


@pytest.mark.parametrize(
    "option",
    [
        "--epochs 0",
        "--batch-size 0",
        "--context-length 0",
        "--eval-freq 0",
        "--eval-iter 0",
        "--warmup 2",
        "--warmup -0.1",
        "--lr -1",
        "--lr nan",
        "--drop-rate 1",
        "--train-ratio 1",
        "--max-grad-norm 0",
        "--weight-decay -1",
        "--seed x",
        "--model 7B",
        "--strategy zero3",
        "--mesh data=0",
        "--mesh pipeline=2",
    ],
)
def test_impossible_train_options_are_usage_errors(cli, option, tmp_path):
    status, _, err = cli("train", *option.split(), "--run-dir", str(tmp_path))
    assert status == 2 and short_error(err) and f"argument {option.split()[0]}" in err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["hi", "--top-k", "0"],
        ["hi", "--top-k", "-3"],
        ["hi", "--temperature", "-1"],
        ["hi", "-n", "-5"],
        [""],
        ["  "],
        ["--chat", ""],
        ["hi", "--chat", "hello"],  # both
        [],  # neither
    ],
)
def test_impossible_generate_options_are_usage_errors(cli, argv, run_dir):
    status, out, err = cli("generate", *argv, "--checkpoint", str(run_dir / "checkpoints"))
    assert status == 2 and short_error(err) and out == ""


def test_top_k_beyond_the_vocabulary_is_a_usage_error(cli, run_dir):
    argv = ["hi", "--checkpoint", str(run_dir), "--top-k", "100000", "--temperature", "1"]
    status, out, err = cli("generate", *argv)
    assert status == 2 and "at most the vocabulary size, 50257" in err and out == ""


@pytest.mark.parametrize(
    "text, message",
    [
        (b"caf\xe9 au lait", "is not UTF-8 text (byte 0xe9 at position 3)"),
        (b"Only a few words here.", "too few for windows of 32 tokens"),
    ],
)
def test_unusable_training_text_is_a_one_line_error(cli, tmp_path, text, message):
    path = tmp_path / "text.txt"
    path.write_bytes(text)
    status, _, err = cli("train", str(path), *TINY_RUN, "--run-dir", str(tmp_path / "r"))
    assert status == 1 and message in err and short_error(err, 1)


def test_a_batch_larger_than_the_training_windows_is_a_one_line_error(cli, tmp_path):
    argv = [*TINY_RUN, "--batch-size", "1000", "--run-dir", str(tmp_path)]
    status, _, err = cli("train", *argv)
    assert status == 1 and "fewer than one batch: lower the batch size" in err
    assert short_error(err, 1)


@pytest.mark.parametrize(
    "options, message",
    [
        ("--mesh data=4,model=4", "mesh: a mesh of data=4,model=4 needs 16 devices; there are 8"),
        ("--mesh data=3", "mesh: a batch of 8 rows does not split over data=3 devices"),
        ("--strategy fsdp+tp", "strategy fsdp+tp needs a mesh, e.g. data=4,model=2"),
    ],
)
def test_a_mesh_the_devices_cannot_form_is_a_one_line_error(cli, tmp_path, options, message):
    argv = [*TINY_RUN[:-2], *options.split(), "--run-dir", str(tmp_path)]  # no --mesh data=1
    status, _, err = cli("train", *argv)
    assert status == 1 and message in err and short_error(err, 1)


def library_greedy(run_dir, prompt: str, n: int) -> str:
    """What the library's greedy decoding makes of `prompt` with the run's checkpoint."""
    cfg, params = checkpoint.load_model(run_dir / "checkpoints")
    tokenizer = gpt2_tokenizer()
    ids = tokenizer.encode(prompt)
    out = generate(params, [ids], n, cfg, eos_id=EOT_ID)[0, len(ids) :]
    return prompt + tokenizer.decode(trim_at_eos(out, EOT_ID)) + "\n"


def test_generate_from_a_checkpoint_or_its_run_folder(run_dir, cli):
    argv = ["Every effort", "--checkpoint", str(run_dir / "checkpoints"), "-n", "5"]
    status, greedy, err = cli("generate", *argv)
    assert status == 0 and greedy == library_greedy(run_dir, "Every effort", 5)
    assert err == f"loading checkpoint {run_dir / 'checkpoints' / '18'}\n"
    assert cli("generate", "Every effort", "--checkpoint", str(run_dir), "-n", "5")[1] == greedy
    sampled = [*argv, "--temperature", "1.0", "--top-k", "5"]
    first = cli("generate", *sampled, "--seed", "7")[1]
    assert cli("generate", *sampled, "--seed", "7")[1] == first  # same seed, same text
    assert cli("generate", *sampled, "--seed", "8")[1] != first


def test_generate_errors_are_one_line(run_dir, cli, tmp_path):
    ckpt = str(run_dir / "checkpoints")
    cases = [
        (["word " * 40, "--checkpoint", ckpt], "shorten the prompt"),
        (["hi", "--checkpoint", str(tmp_path / "missing")], "no checkpoint directory"),
        (["hi", "--checkpoint", str(tmp_path)], "holds no complete checkpoint"),
        (["hi", "--model", "gpt2-124m"], "put it at"),
        (["--chat", "hello", "--checkpoint", ckpt], "--chat needs a chat model"),
    ]
    for argv, message in cases:
        status, _, err = cli("generate", *argv)
        assert status == 1 and message in err and "Traceback" not in err, (argv, err)


@pytest.mark.slow
@pytest.mark.labllama
def test_chat_with_smollm2_from_the_command_line(cli):
    status, out, _ = cli(
        "generate", "--model", "smollm2-135m-instruct", "--chat", "What is the capital of France?"
    )
    assert status == 0 and out == "The capital of France is Paris.\n"


def test_bf16_and_fused_attention_train_from_the_command_line(tmp_path, cli):
    args = [*TINY_RUN, "--epochs", "1", "--drop-rate", "0", "--run-dir", str(tmp_path)]
    assert cli("train", *args, "--bf16", "--fused-attention")[0] == 0
    assert checkpoint.read_meta(tmp_path / "checkpoints")[1]["run"]["bf16"] is True
    status, _, err = cli("train", *TINY_RUN, "--fused-attention", "--run-dir", str(tmp_path / "b"))
    assert status == 1 and "fused_attention has no attention dropout" in err


def test_help_shows_the_defaults(cli):
    status, out, _ = cli("train", "--help")
    assert status == 0
    for option, default in [("--epochs", "10"), ("--lr", "0.0004"), ("--seed", "123")]:
        help_text = out[out.index(option) :].split("\n  -")[0]
        assert f"(default: {default})" in " ".join(help_text.split()), option
    assert "tiny (2 layers of width 32" in " ".join(out.split())


def gptflax(*args, **popen):
    return subprocess.Popen(
        [sys.executable, "-m", "gptflax", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_python_m_gptflax_runs_the_commands(run_dir):
    out, err = gptflax("generate", "Every effort", "--checkpoint", str(run_dir)).communicate()
    assert out == library_greedy(run_dir, "Every effort", 50), err[-2000:]
    usage = gptflax("fly")
    assert usage.wait() == 2 and "error: unknown command 'fly'" in usage.stderr.read()
    listing = gptflax("--help")
    out = listing.stdout.read()
    assert listing.wait() == 0 and "commands:" in out and "  train " in out and "  generate " in out


@pytest.mark.parametrize("script, command", [("gptflax-generate", "generate"), ("gptflax", None)])
def test_installed_scripts_run_their_command(script, command):
    path = Path(sys.executable).parent / script
    if not path.exists():
        pytest.skip(f"{script} is not installed beside this Python")
    out = subprocess.run([path, "--help"], capture_output=True, text=True, check=True).stdout
    usage = out.splitlines()[0]
    assert usage.startswith(f"usage: python -m gptflax {command or 'COMMAND'}"), usage


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_the_step_and_say_how_to_continue(tmp_path, sig, status):
    every = ["--checkpoint-every", "2", "--batch-size", "2", "--epochs", "100"]
    run = gptflax("train", *TINY_RUN, *every, "--run-dir", str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    deadline = time.monotonic() + 240
    while checkpoint.latest_step(ckpts) is None and run.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint in 4 minutes"
        time.sleep(0.2)
    run.send_signal(sig)
    out, err = run.communicate(timeout=120)
    kept = checkpoint.latest_step(ckpts)
    last = err.strip().splitlines()[-1]
    assert run.returncode == status and "Traceback" not in err, err[-3000:]
    assert last == (
        f"stopped by {sig.name}: step {kept} is kept in {ckpts}; "
        f"continue with: python -m gptflax train --run-dir {tmp_path} --resume"
    )
    assert sorted(os.listdir(ckpts)) == [str(s) for s in checkpoint.complete_steps(ckpts)]
    assert len(os.listdir(ckpts)) <= 3  # --keep 3, the default
    saved = checkpoint.read_meta(ckpts)[1]["run"]
    assert json.dumps(saved) and saved["epochs"] == 100 and saved["batch_size"] == 2
    assert (tmp_path / "loss.png").is_file()  # the plot, also when stopped early


def test_help_has_no_doubled_percent_signs_and_lists_every_option(cli):
    out = cli("train", "--help")[1]
    assert "%%" not in out and "--checkpoint-every" in out and "--init" in out


def test_more_new_tokens_than_the_context_holds_say_the_window_slides(run_dir, cli):
    status, out, err = cli("generate", "Every effort", "--checkpoint", str(run_dir), "-n", "40",
                           "--no-eos")  # fmt: skip
    assert status == 0 and out.startswith("Every effort") and len(out) > len("Every effort")
    assert "exceed the context of 32 tokens: the window slides" in err


@pytest.mark.parametrize(
    "options, message",
    [
        ("--num-processes 2", "--num-processes and --process-id need --coordinator HOST:PORT"),
        ("--coordinator localhost:1", "--coordinator needs --num-processes N and --process-id I"),
        ("--coordinator localhost:1 --num-processes 2 --process-id 2", "--process-id 2 is not"),
    ],
)
def test_multi_process_options_that_cannot_work_are_usage_errors(cli, options, message):
    status, _, err = cli("train", *TINY_RUN, *options.split())
    assert status == 2 and message in err and short_error(err)


@pytest.mark.parametrize(
    "process, message",
    [(1, "error: no coordinator answered at localhost:{port} within 3 s: start process 0"),
     (0, "error: not every process joined the coordinator at localhost:{port} within 3 s")],
)  # fmt: skip
def test_a_process_whose_run_never_forms_gives_up_in_one_line(tmp_path, process, message):
    port = _free_port()
    run = gptflax("train", *TINY_RUN, "--coordinator", f"localhost:{port}", "--num-processes",
                  "2", "--process-id", str(process), "--join-timeout", "3",
                  "--run-dir", str(tmp_path))  # fmt: skip
    _, err = run.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 2, err[-3000:]
    assert lines[0] == f"waiting up to 3 s for the run's processes to join at localhost:{port}"
    assert lines[1].startswith(message.format(port=port))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
