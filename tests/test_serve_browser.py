"""The chat page of `python -m gptflax serve` in a real browser: headless Chromium, driven over
the Chrome DevTools protocol on a pipe (no driver, no extra package). A person's chat: type a
question, watch the answer stream in, ask a follow-up, stop a long answer."""

import json
import os
import select
import shutil
import signal
import tempfile

import pytest

pytest.importorskip("starlette", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

from test_serve import in_process_server, wait_for  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.lab7,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"no {CHROMIUM} (apt install chromium)"
    ),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]  # fmt: skip


class Browser:
    """Chromium with one page open at `url`, its DevTools protocol on fds 3 (commands in) and 4
    (replies and events out), each message JSON ending in a NUL byte."""

    def __init__(self, url: str):
        self.profile = tempfile.mkdtemp(prefix="gptflax-chromium-")
        commands, self.commands = os.pipe()
        self.replies, replies = os.pipe()
        self.pid = os.posix_spawn(
            CHROMIUM,
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", url],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, commands, 3),
                (os.POSIX_SPAWN_DUP2, replies, 4),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
        )
        os.close(commands)
        os.close(replies)
        self.buffer, self.last_id = b"", 0
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"],
                                 flatten=True)["sessionId"]  # fmt: skip

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """Run a protocol command; its result."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        os.write(self.commands, json.dumps(message | ({"sessionId": session} if session else {}))
                 .encode() + b"\0")  # fmt: skip
        while True:
            reply = self._next()
            if reply.get("id") == self.last_id:
                assert "error" not in reply, reply
                return reply["result"]

    def _next(self) -> dict:
        while b"\0" not in self.buffer:
            assert select.select([self.replies], [], [], 60)[0], "Chromium did not answer"
            chunk = os.read(self.replies, 1 << 16)
            assert chunk, "Chromium closed its pipe"
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def run(self, expression: str):
        """Evaluate JavaScript in the page: its value."""
        result = self.send("Runtime.evaluate", self.session, expression=expression,
                           returnByValue=True, awaitPromise=True)  # fmt: skip
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def type(self, selector: str, text: str) -> None:
        """Type text into an element, then press Enter, as keys."""
        self.run(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", self.session, text=text)
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", self.session, type=kind, key="Enter",
                      code="Enter", windowsVirtualKeyCode=13)  # fmt: skip

    def close(self) -> None:
        os.kill(self.pid, signal.SIGTERM)
        os.waitpid(self.pid, 0)
        os.close(self.commands)
        os.close(self.replies)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page():
    client = in_process_server("smollm2-135m-instruct")
    browser = Browser(f"http://127.0.0.1:{client.port}/")
    wait_for(lambda: browser.run("document.getElementById('model')?.textContent"), 60, "the page")
    yield browser, client
    browser.close()


# Every text the latest answer shows, recorded as the page changes it.
RECORD = """window.seen = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.assistant');
  window.seen.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""
LAST_ANSWER = "[...document.querySelectorAll('.assistant')].pop().textContent"


def ask(browser, question: str) -> tuple[str, list[str]]:
    """Type a question and wait for the whole answer: (the answer, the texts it showed)."""
    browser.run(RECORD)
    browser.type("#message", question)
    wait_for(lambda: browser.run("document.body.dataset.state") == "answering", 10, "the page")
    wait_for(lambda: browser.run("document.body.dataset.state") == "idle", 120, "the answer")
    return browser.run(LAST_ANSWER), browser.run("window.seen")


def test_a_chat_in_the_browser_streams_the_apis_answers_and_stops(page):
    browser, client = page
    system = "You are a geography teacher. Answer every question in one short sentence."
    browser.run(f"document.getElementById('system').value = {json.dumps(system)};"
                "document.getElementById('temperature').value = '0';")  # fmt: skip
    settings = {"temperature": 0, "top_p": 0.9, "repetition_penalty": 1.1}  # the page's others
    chat = [{"role": "system", "content": system}]
    for question in ("What is the capital of France?", "And of Germany?"):
        answer, seen = ask(browser, question)
        chat.append({"role": "user", "content": question})
        api = client.post("/v1/chat/completions", {"messages": chat, **settings})
        assert answer == api["choices"][0]["message"]["content"] and answer
        partial = [text for text in seen if text and text != answer]
        assert len(set(partial)) >= 2 and all(answer.startswith(text) for text in partial)
        chat.append({"role": "assistant", "content": answer})
    assert "Paris" in chat[2]["content"] and "Berlin" in chat[4]["content"]  # two turns
    browser.run("document.getElementById('new').click()")
    assert browser.run("document.querySelectorAll('.message').length") == 0  # a new chat
    cancelled = client.health()["ended"].get("cancelled", 0)
    browser.type("#message", "Write a long story about a dragon.")
    wait_for(lambda: len(browser.run(LAST_ANSWER)) > 40, 120, "the story")
    browser.run("document.getElementById('stop').click()")
    wait_for(lambda: browser.run("document.body.dataset.state") == "idle", 10, "the stop button")
    assert browser.run("[...document.querySelectorAll('.assistant')].pop().className").endswith(
        "stopped"
    )
    wait_for(lambda: client.health()["active"] == 0, 30, "the row")  # the server stopped too
    assert client.health()["ended"]["cancelled"] == cancelled + 1
