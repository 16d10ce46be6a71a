"""`python -m gptflax serve`: a model behind an OpenAI-compatible HTTP API, with a chat page at /
(gptflax.serve; needs the `serve` extra)."""

from __future__ import annotations

import argparse

from gptflax.cli.common import (
    POSITIVE,
    CommandError,
    add_model_options,
    load_model,
    ranged,
    run_command,
)


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptflax serve",
        usage="%(prog)s --model NAME | --checkpoint DIR [options]  (--help lists them)",
        description="Serve a model over HTTP: OpenAI's /v1/chat/completions and /v1/completions "
        "(streamed as server-sent events when asked), /v1/models, /health, and a chat page at /. "
        "Requests that arrive together decode together, up to --slots at a time.",
    )
    add_model_options(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default: %(default)s, this machine only)",
    )
    p.add_argument("--port", type=ranged("int", lambda v: 0 < v < 65536, "1 to 65535"),
                   default=8000, help="the port (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--slots",
        type=POSITIVE,
        default=8,
        help="requests decoded together at most; more wait (default: %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def serve_main(argv: list[str] | None = None) -> int:
    args = serve_parser().parse_args(argv)
    return run_command(args, lambda: _serve(args))


def _serve(args) -> int:
    try:
        import uvicorn

        from gptflax.serve import create_app
    except ModuleNotFoundError as e:
        raise CommandError(
            f"serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'"
        ) from e
    model = load_model(args)
    print(f"serving {model.name} at http://{args.host}:{args.port}/ (a chat page; the API under "
          "/v1), once its first steps have compiled; Ctrl-C stops", flush=True)  # fmt: skip
    uvicorn.run(create_app(model, slots=args.slots), host=args.host, port=args.port)
    return 0
