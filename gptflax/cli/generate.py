"""`python -m gptflax generate` and `python -m gptflax chat`: a model's text, printed token by
token as it is decoded; Ctrl-C stops the text but keeps what was printed."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time

import jax
from tqdm.auto import tqdm

from gptflax.cli.common import (
    POSITIVE,
    CommandError,
    add_model_options,
    add_sampling_options,
    load_model,
    run_command,
    sampling_of,
)
from gptflax.streaming import CHAT_SAMPLING, ChatSession, Sampling, stream_tokens


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax generate",
        usage="%(prog)s PROMPT | --chat MESSAGE, and --model NAME | --checkpoint DIR "
        "[options]  (--help lists them)",
        description="Continue a prompt with a model by name (OpenAI's GPT-2, SmolLM2-135M-"
        "Instruct, Gemma 3 270M, ...) or a trained one (a checkpoint folder written by "
        "`python -m gptflax train`), or answer one chat message (--chat), printing each token as "
        "it is decoded. Temperature 0 is greedy; above 0 it samples (Book §5.3).",
    )
    p.add_argument("prompt", nargs="?", help="the text to continue")
    p.add_argument("--chat", metavar="MESSAGE", help="a user message to answer (chat models)")
    add_model_options(p)
    p.add_argument("-n", "--max-new-tokens", type=POSITIVE, default=50,
                   help="tokens to add at most (default: %(default)s)")  # fmt: skip
    add_sampling_options(p, Sampling(), seed=123)
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.chat is None):
        parser.error("give a prompt to continue or --chat MESSAGE, not both and not neither")
    if not (args.chat if args.prompt is None else args.prompt).strip():
        parser.error("the prompt is empty: give some text to continue")
    return run_command(args, lambda: _generate(parser, args))


def _generate(parser: argparse.ArgumentParser, args) -> int:
    model = load_model(args)
    cfg, tokenizer = model.cfg, model.tokenizer
    sampling = sampling_of(args, parser, cfg.vocab_size)
    if args.chat is not None:
        if tokenizer.chat is None:
            raise CommandError(
                "--chat needs a chat model (--model smollm2-135m-instruct, or a checkpoint of one)"
            )
        session = ChatSession(model, sampling=sampling, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)  # fmt: skip
        return _print_stream(session.reply(args.chat), "")
    ids = tokenizer.encode(args.prompt, allowed_special="all", bos=True)
    if len(ids) >= cfg.context_length:
        raise CommandError(
            f"the prompt has {len(ids)} tokens; this model's context holds "
            f"{cfg.context_length}: shorten the prompt"
        )
    n = args.max_new_tokens
    eos = None if args.no_eos else tokenizer.eos_id
    tokens = stream_tokens(model.params, ids, n, cfg, sampling=sampling,
                           key=jax.random.key(args.seed), eos_id=eos)  # fmt: skip
    if len(ids) + n > cfg.context_length:
        print(f"the prompt and {n} new tokens exceed the context of {cfg.context_length} tokens: "
              "the window slides, each new token recomputing the last "
              f"{cfg.context_length}", file=sys.stderr)  # fmt: skip
        tokens = tqdm(tokens, total=n, unit="token", file=sys.stderr, leave=False)
    return _print_stream(_texts(tokens, tokenizer, eos), args.prompt)


def _texts(tokens, tokenizer, eos):
    """Pieces of the decoded text, a piece per token (held back while a character is split)."""
    ids, shown = [], ""
    for token in tokens:
        if token == eos:
            return
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text


def _print_stream(pieces, first: str) -> int:
    """Print `first`, then each piece as it comes; Ctrl-C keeps what was printed (exit 130)."""
    print(first, end="", flush=True)
    try:
        with _stop_between_tokens() as stopped:
            for piece in pieces:
                print(piece, end="", flush=True)
                if stopped():
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        pieces.close()  # ends the stream's generator here: a chat keeps the reply so far
        print("\n[stopped]", file=sys.stderr)
        return 130
    print()
    return 0


@contextlib.contextmanager
def _stop_between_tokens():
    """Ctrl-C while tokens stream: a flag read between tokens, not an exception raised inside
    a decoding step (which JAX's native code may swallow, or which may leave a cache donated to
    a step that never returned); a second Ctrl-C stops at once. Yields a `stopped()` test."""
    pressed = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


# --- chat -----------------------------------------------------------------------------------------

HELP = ("type a message; /reset forgets the chat, /system TEXT starts one with that system prompt, "
        "/exit (or Ctrl-D) ends; Ctrl-C stops an answer")  # fmt: skip


def chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax chat",
        usage="%(prog)s --model NAME | --checkpoint DIR [options]  (--help lists them)",
        description="Chat with a chat model, turn after turn: each answer is printed as it is "
        "decoded, and the model reads the whole conversation (kept in its KV cache). " + HELP,
    )
    add_model_options(p)
    p.add_argument("--system", help="the system prompt (default: the model's own, if any)")
    p.add_argument("-n", "--max-new-tokens", type=POSITIVE, default=512,
                   help="tokens an answer has at most (default: %(default)s)")  # fmt: skip
    add_sampling_options(p, CHAT_SAMPLING, seed=0)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def chat_main(argv: list[str] | None = None) -> int:
    parser = chat_parser()
    args = parser.parse_args(argv)
    return run_command(args, lambda: _chat(parser, args))


def _chat(parser: argparse.ArgumentParser, args) -> int:
    name = args.model or args.checkpoint
    print(f"loading {name} ...", flush=True)
    t0 = time.perf_counter()
    model = load_model(args)
    if model.tokenizer.chat is None:
        raise CommandError(f"{name} has no chat template: it continues text (use generate)")
    sampling = sampling_of(args, parser, model.cfg.vocab_size)
    session = ChatSession(model, system=args.system, sampling=sampling,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)  # fmt: skip
    print(f"{name} is ready ({time.perf_counter() - t0:.1f} s). {HELP}")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D ends the chat)")
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            print("(the chat is forgotten)")
        elif line.startswith("/system"):
            session.reset(system=line.removeprefix("/system").strip())
            print(f"(a new chat, with the system prompt {session.system!r})")
        elif line:
            _print_stream(session.reply(line), "")
