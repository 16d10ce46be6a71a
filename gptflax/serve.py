"""A model behind an OpenAI-compatible HTTP API, with a chat page: `python -m gptflax serve`.

Routes: POST /v1/chat/completions and /v1/completions take OpenAI's requests (messages or prompt,
max_tokens, temperature, top_p, stop, seed, stream; vLLM's top_k and repetition_penalty too) and
answer in OpenAI's shapes, `stream` as server-sent events; GET /v1/models, GET /health, and GET /
the chat page (gptflax/static/chat.html). Concurrent requests decode together, a row each, through
one `batching.Batcher`; a client that disconnects frees its row. A bad request gets a 4xx status
and OpenAI's error body, {"error": {"message", "type", "param", "code"}}.

Starlette (ASGI) and uvicorn, the `serve` extra: `pip install -e '.[serve]'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gptflax.batching import Batcher, Request
from gptflax.sources import Model
from gptflax.streaming import CHAT_SAMPLING, Sampling

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def decoding_failed() -> APIError:
    return APIError(500, "decoding failed (the server's log says why)", kind="server_error")


class TextPieces:
    """An answer's text as its tokens arrive: `add(id)` returns what is final so far, holding
    back a character not yet complete and an end that may begin a stop string; after a stop
    string, `stopped` is set and the text ends before it."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.shown, self.stopped = 0, False

    def add(self, token: int) -> str:
        """The new final text after `token`."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        found = [i for s in self.stop if (i := text.find(s)) >= 0]
        if found:
            self.stopped = True
            return self._upto(text, min(found))
        if text.endswith("\ufffd"):  # a character split between tokens
            return ""
        held = [k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])]
        return self._upto(text, len(text) - max(held, default=0))

    def rest(self) -> str:
        """What was held back, at the end of the answer."""
        return "" if self.stopped else self._upto(self.tokenizer.decode(self.ids), None)

    def _upto(self, text: str, end: int | None) -> str:
        piece = text[self.shown : end]
        self.shown += len(piece)
        return piece


class ChatEndpoint:
    """/v1/chat/completions: replies are a message, or deltas; a setting left out is the `chat`
    command's (temperature 0.3, top-p 0.9, repetition penalty 1.1: small models loop without)."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"
    defaults = CHAT_SAMPLING

    @staticmethod
    def choice(text: str, finish: str | None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "finish_reason": finish}

    @staticmethod
    def delta(text: str, finish: str | None) -> dict:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}


class CompletionEndpoint:
    """/v1/completions: replies are the text, whole or in pieces; a setting left out is OpenAI's
    (temperature 1, no filters)."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"
    defaults = Sampling(temperature=1.0)

    @staticmethod
    def choice(text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    delta = choice


class Server:
    """The API over one model, whose requests a `Batcher` decodes `slots` at a time."""

    def __init__(self, model: Model, slots: int = 8):
        self.model, self.slots = model, slots
        self.batcher: Batcher | None = None  # started with the app (`lifespan`)
        self.page = (resources.files("gptflax") / "static" / "chat.html").read_text()

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """Start the batcher and compile its step before the first request; stop it."""
        self.batcher = Batcher(self.model.params, self.model.cfg, slots=self.slots)
        await asyncio.to_thread(self.batcher.warm_up)
        yield
        self.batcher.close()

    async def chat_completions(self, http: HTTPRequest) -> Response:
        body = await _json_body(http)
        tokenizer = self.model.tokenizer
        if tokenizer.chat is None:
            raise APIError(400, f"{self.model.name} has no chat template: use /v1/completions",
                           "model", "model_not_supported")  # fmt: skip
        ids = tokenizer.encode_chat(_messages(body))
        return await self._answer(http, body, ids, ChatEndpoint)

    async def completions(self, http: HTTPRequest) -> Response:
        body = await _json_body(http)
        ids = self._prompt_ids(body.get("prompt"))
        return await self._answer(http, body, ids, CompletionEndpoint)

    async def models(self, http: HTTPRequest) -> Response:
        card = {"id": self.model.name, "object": "model", "created": 0, "owned_by": "gptflax"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, http: HTTPRequest) -> Response:
        b = self.batcher
        return JSONResponse({"status": "ok", "model": self.model.name, "slots": self.slots,
                             "active": b.active, "waiting": len(b.waiting),
                             "ended": dict(b.ended)})  # fmt: skip

    async def chat_page(self, http: HTTPRequest) -> Response:
        return HTMLResponse(self.page)

    def _prompt_ids(self, prompt) -> list[int]:
        """/v1/completions' prompt: a text, a list of one text, or a list of token ids."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return self.model.tokenizer.encode(prompt, allowed_special="all", bos=True)
        vocab = self.model.cfg.vocab_size
        if isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < vocab
                                                       for t in prompt):  # fmt: skip
            return prompt
        raise APIError(400, "prompt must be a non-empty string, or a list of token ids below "
                       f"{vocab} (one prompt per request)", "prompt")  # fmt: skip

    async def _answer(self, http: HTTPRequest, body: dict, ids: list[int], endpoint) -> Response:
        """Decode a request, its reply shaped as `endpoint` says: streamed, or whole."""
        request, stop = self._request(body, ids, endpoint.defaults)
        pieces = TextPieces(self.model.tokenizer, stop)
        reply = {"id": endpoint.id_prefix + uuid.uuid4().hex[:24], "object": endpoint.object,
                 "created": int(time.time()), "model": self.model.name}  # fmt: skip
        answer = self._pieces(request, pieces)
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage")
            usage = (lambda: _usage(len(ids), len(pieces.ids))) if include_usage else None
            events = _events(answer, reply, endpoint, usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        whole = await _unless_disconnected(http, _joined(answer))
        if whole is None:
            return Response(status_code=499)  # nobody reads it
        text, finish = whole
        if finish == "error":
            raise decoding_failed()
        choices, usage = [endpoint.choice(text, finish)], _usage(len(ids), len(pieces.ids))
        return JSONResponse({**reply, "choices": choices, "usage": usage})

    def _request(self, body: dict, ids: list[int], defaults: Sampling) -> tuple[Request, list]:
        """The batcher's request for a body's settings (`defaults` for those left out), and its
        stop strings."""
        name = body.get("model")
        if name is not None and name != self.model.name:
            raise APIError(404, f"The model `{name}` does not exist: this server has "
                           f"`{self.model.name}` (GET /v1/models)", "model",
                           "model_not_found")  # fmt: skip
        if body.get("n") not in (None, 1):
            raise APIError(400, "n: only 1 choice per request", "n")
        room = self.model.cfg.context_length - len(ids)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _option("max_tokens", max_tokens, int, room, lambda v: v >= 1, "at least 1")
        if room < 1 or max_tokens > room:
            raise APIError(400, f"This model's maximum context length is "
                           f"{self.model.cfg.context_length} tokens. However, you requested "
                           f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, "
                           f"{max_tokens} in the completion).", "max_tokens",
                           "context_length_exceeded")  # fmt: skip
        sampling = Sampling(
            _option("temperature", body.get("temperature"), float, defaults.temperature,
                    lambda v: 0 <= v <= 2, "between 0 and 2"),
            _option("top_k", body.get("top_k"), int, defaults.top_k, lambda v: v >= 1,
                    "at least 1"),
            _option("top_p", body.get("top_p"), float, defaults.top_p, lambda v: 0 < v <= 1,
                    "above 0 and at most 1"),
            _option("repetition_penalty", body.get("repetition_penalty"), float,
                    defaults.repetition_penalty, lambda v: v > 0, "above 0"),
        )  # fmt: skip
        seed = _option("seed", body.get("seed"), int, secrets.randbits(32), lambda v: True, "")
        eos = frozenset({self.model.tokenizer.eos_id})
        return Request(ids, max_tokens, sampling, seed, eos), _stop_strings(body.get("stop"))

    async def _pieces(self, request: Request, pieces: TextPieces) -> AsyncIterator[tuple]:
        """(text, None) as the answer grows, then (the rest, why it ended)."""
        async with contextlib.aclosing(self._tokens(request)) as tokens:
            async for item in tokens:
                if isinstance(item, str):
                    yield pieces.rest(), item
                    return
                text = pieces.add(item)
                if pieces.stopped:
                    yield text, "stop"
                    return
                if text:
                    yield text, None

    async def _tokens(self, request: Request) -> AsyncIterator[int | str]:
        """The request's new ids as the batcher decodes them, then why it ended; leaving early
        (a stop string, a client gone) cancels the request and frees its row."""
        loop, items = asyncio.get_running_loop(), asyncio.Queue()

        def emit(item):  # called by the batcher's thread
            with contextlib.suppress(RuntimeError):  # the event loop has closed
                loop.call_soon_threadsafe(items.put_nowait, item)

        job = self.batcher.submit(request, emit)
        try:
            while isinstance(item := await items.get(), int):
                yield item
            yield item
        finally:
            self.batcher.cancel(job)


def create_app(model: Model, *, slots: int = 8) -> Starlette:
    """The ASGI app serving `model` (see the module's docstring)."""
    server = Server(model, slots)
    routes = [
        Route("/", server.chat_page),
        Route("/health", server.health),
        Route("/v1/models", server.models),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=server.lifespan)


async def _api_error(http: HTTPRequest, e: APIError) -> Response:
    return e.response()


async def _http_error(http: HTTPRequest, e: HTTPException) -> Response:
    """Starlette's own errors (no such route, a method not allowed) in OpenAI's shape."""
    return APIError(e.status_code, f"{e.detail} ({http.method} {http.url.path})").response()


async def _server_error(http: HTTPRequest, e: Exception) -> Response:
    return APIError(500, f"internal error: {type(e).__name__}", kind="server_error").response()


async def _json_body(http: HTTPRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}).") from e
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


def _messages(body: dict) -> list[dict]:
    """A chat request's messages as the chat template reads them; text parts joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content}", "messages")
    plain = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            content = "".join(texts) if all(isinstance(t, str) for t in texts) else None
        role = ROLES.get(m.get("role")) if isinstance(m, dict) else None
        if role is None or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must have a role ({', '.join(ROLES)}) and text "
                           "content", f"messages[{i}]")  # fmt: skip
        plain.append({"role": role, "content": content})
    return plain


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _option(name: str, value, kind: type, default, ok, what: str):
    """A request's setting, checked: `default` when absent; a 400 naming it when bad."""
    if value is None:
        return default
    number = float(value) if kind is float and _is_int(value) else value
    good = _is_int(number) if kind is int else isinstance(number, float) and math.isfinite(number)
    if not good or not ok(number):
        must = f"must be {'a whole number' if kind is int else 'a number'} {what}".strip()
        raise APIError(400, f"{name} {must}, not {json.dumps(value)}", name, "invalid_value")
    return number


def _stop_strings(stop) -> list[str]:
    """`stop`: a string or a list of up to 4."""
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (
        not isinstance(stops, list)
        or len(stops) > 4
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4", "stop")
    return stops


async def _events(answer, reply: dict, endpoint, usage) -> AsyncIterator[str]:
    """An answer as server-sent events: chunks of text, the finish reason, the usage if
    `usage` (a function) is given, then [DONE]."""
    chunk = {**reply, "object": endpoint.chunk_object}
    if endpoint is ChatEndpoint:
        start = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield _event({**chunk, "choices": [start]})
    async for text, finish in answer:
        if finish == "error":
            yield _event(decoding_failed().body())
            return
        if text or finish:
            yield _event({**chunk, "choices": [endpoint.delta(text, finish)]})
    if usage is not None:
        yield _event({**chunk, "choices": [], "usage": usage()})
    yield "data: [DONE]\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _joined(answer) -> tuple[str, str]:
    """The whole text of an answer, and why it ended."""
    pieces = [piece async for piece in answer]
    return "".join(text for text, _ in pieces), pieces[-1][1]


async def _unless_disconnected(http: HTTPRequest, work):
    """What `work` returns, or None if the client disconnects first (then work is cancelled)."""

    async def disconnected():
        while (await http.receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(work), asyncio.ensure_future(disconnected())]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    return tasks[0].result() if tasks[0] in done else None
