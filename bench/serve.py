"""Serving throughput: tokens/s of `python -m gptflax serve` with 1, 4 and 16 clients sending
requests at the same time, beside the same kind of requests sent one at a time.

Each model is served by its own process on 127.0.0.1 (`--slots` rows decoded together); each
client sends `rounds` greedy /v1/completions requests of `max_tokens` tokens, one after the other.
Tokens are the completion tokens the server reports. A warm-up round compiles first.
`python bench/serve.py [--quick] [--out runs/bench]` writes serve.json and serve.md (`make bench`
runs it after bench.py); `serve_report()` returns the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from report import save

ANIMALS = ["dragon", "fox", "owl", "whale", "cat", "bear", "wolf", "eagle"]


def serve_report(
    models=("tiny-llama", "smollm2-135m-instruct"),
    clients=(1, 4, 16),
    *,
    slots: int = 16,
    max_tokens: int = 64,
    rounds: int = 2,
    alone: int = 8,
) -> dict:
    """For each model: tokens/s of `alone` requests one at a time, and of each number of
    concurrent clients (with the speed-up over one at a time)."""
    report = {"date": time.strftime("%Y-%m-%d"), "slots": slots, "max_tokens": max_tokens,
              "rounds": rounds, "models": {}}  # fmt: skip
    for name in models:
        with server(name, slots) as port:
            send = lambda n, count: timed(port, n, count, max_tokens)  # noqa: E731
            send(max(clients), max(clients))  # warm-up: compiles what the rounds need
            one = send(1, alone)
            together = {n: send(n, n * rounds) for n in clients}
            for r in together.values():
                r["speedup"] = r["tokens_per_s"] / one["tokens_per_s"]
            report["models"][name] = {"one_at_a_time": one, "concurrent": together}
    return report


def serve_markdown(report: dict) -> str:
    """The report as a markdown table."""
    counts = list(next(iter(report["models"].values()))["concurrent"])
    lines = [
        f"## Serving: `python -m gptflax serve`, {report['slots']} slots, greedy, "
        f"{report['max_tokens']} tokens a request ({report['date']})",
        "",
        "| model | one at a time | " + " | ".join(f"{n} clients" for n in counts) + " |",
        "|---|---|" + "---|" * len(counts),
    ]
    for name, m in report["models"].items():
        cells = [f"{r['tokens_per_s']:.1f} ({r['speedup']:.2f}x)" for r in m["concurrent"].values()]
        lines.append(f"| {name} | {m['one_at_a_time']['tokens_per_s']:.1f} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines + ["", "tokens/s (speed-up over one at a time)"]) + "\n"


def timed(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` completions from `clients` clients at once: tokens, seconds, tokens/s."""
    bodies = [{"prompt": f"Once upon a time, a {ANIMALS[i % len(ANIMALS)]} named {i}",
               "max_tokens": max_tokens, "temperature": 0} for i in range(requests)]  # fmt: skip
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(lambda body: completion_tokens(port, body), bodies))
    seconds = time.perf_counter() - start
    return {"clients": clients, "requests": requests, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}  # fmt: skip


def completion_tokens(port: int, body: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    answer = json.loads(reply.read())
    conn.close()
    if reply.status != 200:
        raise RuntimeError(f"the server refused a request: {answer}")
    return answer["usage"]["completion_tokens"]


@contextlib.contextmanager
def server(model: str, slots: int):
    """`python -m gptflax serve` on a free port of 127.0.0.1, until the block ends: the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "gptflax", "serve", "--model", model, "--port", str(port),
               "--slots", str(slots)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`{' '.join(command)}` did not start")
            time.sleep(0.2)
        yield port
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny-llama only, 16 tokens a request")
    p.add_argument("--out", default="runs/bench", help="folder for serve.json and serve.md")
    args = p.parse_args(argv)
    options = dict(models=("tiny-llama",), max_tokens=16) if args.quick else {}
    report = serve_report(**options)
    save(report, serve_markdown(report), Path(args.out), "serve")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
