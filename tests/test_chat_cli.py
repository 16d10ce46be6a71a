"""`python -m gptflax chat` and `generate` in a pseudo-terminal, as a person types: answers stream
token by token, the model remembers the chat, Ctrl-C stops an answer and keeps the session."""

import os
import pty
import select
import signal
import sys
import time

import pytest

# The child execs the command at once, so forking from a process with JAX's threads is safe here.
pytestmark = [pytest.mark.labllama, pytest.mark.slow, pytest.mark.filterwarnings("ignore:os.fork")]
GREEDY = ["--temperature", "0", "--repetition-penalty", "1.0"]


class Terminal:
    """A command running in a pseudo-terminal; `chunks` are (time, bytes) as they arrived."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, its terminal the pty
            # as a shell starts a foreground job: Ctrl-C's SIGINT neither ignored nor blocked
            # (the worker process may carry either over from an earlier test)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execv(sys.executable, [sys.executable, "-m", "gptflax", *args])
        self.out, self.chunks = b"", []

    def read_until(self, done, timeout: float = 240) -> str:
        """Read until done(text read since the call) holds; that text."""
        start, end = len(self.out), time.monotonic() + timeout
        while not done(self.out[start:].decode(errors="replace")):
            assert time.monotonic() < end, self.out.decode(errors="replace")[-2000:]
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the command ended
                    break
                self.out += data
                self.chunks.append((time.monotonic(), data))
        return self.out[start:].decode(errors="replace")

    def answer(self, line: str) -> tuple[str, int]:
        """Type a line; (what came back until the next prompt, how many reads it took)."""
        before = len(self.chunks)
        os.write(self.fd, line.encode() + b"\n")
        text = self.read_until(lambda t: t.endswith("\n> "))
        return text.removeprefix(line).strip().removesuffix(">").strip(), len(self.chunks) - before

    def exit_status(self) -> int:
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


def test_a_chat_streams_remembers_forgets_and_survives_ctrl_c():
    chat = Terminal("chat", "--model", "smollm2-135m-instruct", *GREEDY, "-n", "60")
    banner = chat.read_until(lambda t: t.endswith("> "))
    assert "loading smollm2-135m-instruct" in banner and "/reset forgets the chat" in banner
    chat.answer("I have three cats.")
    answer, reads = chat.answer("How many cats do I have?")
    assert "three" in answer and reads >= 3  # remembered; printed as decoded, in pieces
    assert chat.answer("/reset")[0] == "(the chat is forgotten)"
    assert "three" not in chat.answer("How many cats do I have?")[0]  # forgotten
    os.write(chat.fd, b"Write a long story about a dragon.\n")
    chat.read_until(lambda t: len(t.split()) > 12)  # the story has begun
    os.write(chat.fd, b"\x03")  # Ctrl-C, as the terminal sends it
    stopped = chat.read_until(lambda t: t.endswith("\n> "))
    assert "[stopped]" in stopped and "Traceback" not in stopped
    assert "Paris" in chat.answer("What is the capital of France?")[0]  # the session goes on
    os.write(chat.fd, b"/exit\n")
    assert chat.exit_status() == 0


def test_generate_streams_and_keeps_its_text_on_ctrl_c():
    run = Terminal("generate", "Once upon a time", "--model", "smollm2-135m-instruct", "-n", "400",
                   *GREEDY, "--no-eos")  # fmt: skip
    text = run.read_until(lambda t: len(t.split()) > 15)
    assert text.startswith("Once upon a time")
    os.write(run.fd, b"\x03")
    rest = run.read_until(lambda t: "[stopped]" in t)
    assert run.exit_status() == 130 and "Traceback" not in rest
    assert len((text + rest).split()) > 15  # what was printed is still there
