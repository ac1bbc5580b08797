"""A reference Modal LLM endpoint: the other side of the wire, for tests, demos and benchmarks.

It speaks the endpoint contract and its streaming extension the way a well-behaved Modal
web endpoint does (422 from FastAPI-style validation, 401 from the proxy, 303 result URLs
after ``hop_time``), with a deterministic toy generator standing in for a model. Every
Modal misbehaviour is a switch on :class:`ServerConfig`, all off by default::

    from modal_llm.server import ServerConfig, create_app, serve, STATS

    async with serve(ServerConfig(pieces=4, rate_limit_every=3, retry_after="0")) as url:
        ...  # POST {"prompt": "hi"} to url

    app = create_app(ServerConfig(work_time=0.2, hop_time=0.05))
    async with serve(app) as url:
        ...
        await app[STATS].wait_for(lambda s: s.generations_finished == 1)

From a shell: ``python -m modal_llm.server --port 8000 --pieces 16 --piece-delay 0.05``
(``modal-llm serve`` runs the same). This module never imports the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import random
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from modal_llm._exceptions import ConfigError

__all__ = [
    "CONFIG",
    "STATS",
    "ServerConfig",
    "ServerStats",
    "build_parser",
    "config_from_args",
    "create_app",
    "main",
    "serve",
    "split_pieces",
    "toy_generate",
    "validate_body",
]

RESULT_QUERY = "__modal_function_call_id"
"""The query parameter of a Modal result URL."""

STREAM_FORMATS = ("sse", "ndjson", "text", "json")

MODAL_HOP_TIME = 150.0
"""How long real Modal lets one HTTP request block before it answers 303."""

RECENT_KEPT = 100
"""How many request bodies and header sets :class:`ServerStats` keeps."""

MISSING_CREDENTIALS = "modal-http: missing credentials for proxy authorization"
# Modal documents only the "missing" body; this one is our choice for a wrong key/secret.
INVALID_CREDENTIALS = "modal-http: invalid credentials for proxy authorization"
INVALID_CALL = "modal-http: invalid function call"
INTERNAL_ERROR = "modal-http: internal error"

_DONE = b"data: [DONE]\n\n"
_KEEPALIVE = b": keep-alive\n\n"
_CONTENT_TYPES = {
    "sse": "text/event-stream; charset=utf-8",
    "ndjson": "application/x-ndjson",
    "text": "text/plain; charset=utf-8",
}
# Pydantic's lax-mode booleans, so "stream" validates like the FastAPI endpoint's `bool` field.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the reference endpoint behaves; every fault is off by default.

    Usage::

        ServerConfig()                                    # a healthy, instant endpoint
        ServerConfig(pieces=16, piece_delay=0.05)         # a slow SSE stream
        ServerConfig(stream_format="ndjson")              # NDJSON instead of SSE
        ServerConfig(cold_start=2.0, latency=0.1)         # slow first byte
        ServerConfig(rate_limit_every=3, retry_after="1") # every 3rd POST: 429, Retry-After: 1
        ServerConfig(error_burst=2, error_status=502)     # first two POSTs: 502
        ServerConfig(failure_rate=0.1, seed=7)            # 10% of POSTs: 500, reproducibly
        ServerConfig(modal_key="wk-1", modal_secret="ws-1")  # proxy auth required
        ServerConfig(work_time=0.2, hop_time=0.05)        # 303 result-URL chain

    POST faults are decided in this order, numbering the POSTs that passed auth: the
    ``error_burst``, then ``rate_limit_every``/``rate_limit_rate``, then ``failure_rate``.
    Each POST draws the same two random numbers whichever switches are on, so a seed gives
    one fault sequence. ``latency`` and ``cold_start`` do not count against ``hop_time``;
    ``work_time`` applies to non-streaming replies only (streams pace with ``piece_delay``).
    """

    pieces: int = 8
    """How many pieces the toy answer is split into when streaming."""
    piece_delay: float = 0.0
    """Seconds between streamed pieces."""
    latency: float = 0.0
    """Seconds before answering each POST (time to first byte)."""
    cold_start: float = 0.0
    """Extra delay for the first POST that gets through (concurrent ones share the wait)."""
    idle_reset: float = 0.0
    """After this many idle seconds the container is cold again (0 = never)."""
    stream_format: str = "sse"
    """"sse" | "ndjson" | "text" | "json": what a streaming request gets; a body's "format"
    key overrides it."""
    rate_limit_every: int = 0
    """Every Nth POST gets 429 (0 = off)."""
    rate_limit_rate: float = 0.0
    """A random fraction of POSTs gets 429."""
    retry_after: str | None = None
    """The Retry-After header on every 429 (seconds or an HTTP date); None sends none."""
    error_burst: int = 0
    """The first N POSTs get ``error_status`` (a 5xx burst while containers start)."""
    error_status: int = 503
    """The status of the ``error_burst`` and of ``poll_error_every`` answers."""
    failure_rate: float = 0.0
    """A random fraction of POSTs gets 500 "modal-http: internal error"."""
    modal_key: str | None = field(default=None, repr=False)
    """With ``modal_secret``: require these Modal-Key/Modal-Secret headers, else 401."""
    modal_secret: str | None = field(default=None, repr=False)
    work_time: float = 0.0
    """Simulated generation time of a non-streaming reply; above ``hop_time`` it runs in the
    background and the POST answers 303 to its result URL."""
    hop_time: float = MODAL_HOP_TIME
    """How long one HTTP request may block before the endpoint answers 303."""
    poll_error_every: int = 0
    """Every Nth GET of a result URL gets ``error_status`` and keeps the result (0 = off)."""
    stream_flag: str = "stream"
    """The body key that asks for a stream."""
    sse_comment_every: int = 0
    """SSE: send a ``: keep-alive`` comment before every Nth piece, the first included."""
    stream_drop_after: int | None = None
    """Close the connection after this many pieces, with no terminator."""
    stream_error_after: int | None = None
    """After this many pieces send an error (SSE ``event: error``, NDJSON ``{"error": ...}``)
    and end; a text stream drops the connection instead."""
    stream_no_terminator: bool = False
    """SSE: end cleanly but without ``data: [DONE]``."""
    split_utf8: bool = False
    """Text streams: cut the bytes evenly, so multibyte characters straddle chunks."""
    echo_prompt: bool = False
    """Start the reply with the prompt, as some completion servers do."""
    seed: int = 0
    """Seeds the random fault choices so runs are reproducible."""
    gate: asyncio.Event | None = field(default=None, compare=False, repr=False)
    """Tests: when set, a stream sends its first piece, then waits for this event."""

    def __post_init__(self) -> None:
        if self.pieces < 1:
            raise ConfigError(f"pieces must be at least 1, not {self.pieces}")
        for name in ("piece_delay", "latency", "cold_start", "idle_reset", "work_time"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.hop_time <= 0:
            raise ConfigError("hop_time must be positive")
        if self.stream_format not in STREAM_FORMATS:
            raise ConfigError(
                f"stream_format must be one of {', '.join(STREAM_FORMATS)}, "
                f"not {self.stream_format!r}"
            )
        for name in ("rate_limit_rate", "failure_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1")
        for name in ("rate_limit_every", "error_burst", "poll_error_every", "sse_comment_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        for name in ("stream_drop_after", "stream_error_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must not be negative")
        if not 400 <= self.error_status <= 599:
            raise ConfigError(f"error_status must be a 4xx or 5xx status, not {self.error_status}")
        if (self.modal_key is None) != (self.modal_secret is None):
            raise ConfigError("modal_key and modal_secret must be set together")
        if not self.stream_flag:
            raise ConfigError("stream_flag must not be empty")


@dataclass
class ServerStats:
    """What the server saw, for tests and the demo; mutated by the server as it runs.

    ``await stats.wait_for(lambda s: s.disconnects == 1)`` waits for a condition without sleeping.
    """

    requests: int = 0
    posts: int = 0
    gets: int = 0
    generations_started: int = 0
    """Work actually started: one per reply generated, never one per poll."""
    generations_finished: int = 0
    cold_starts: int = 0
    in_flight: int = 0
    """Requests being handled right now."""
    max_in_flight: int = 0
    disconnects: int = 0
    """Clients that went away mid-stream or while waiting for an answer."""
    statuses: dict[int, int] = field(default_factory=dict)
    """How many replies had each status."""
    # Headers and bodies stay out of repr: they can hold Modal-Key/Modal-Secret.
    last_headers: CIMultiDict[str] = field(default_factory=CIMultiDict, repr=False)
    """A copy of the last request's headers."""
    recent_headers: deque[CIMultiDict[str]] = field(
        default_factory=lambda: deque(maxlen=RECENT_KEPT), repr=False
    )
    """Headers of the last requests, oldest first."""
    bodies: deque[Any] = field(default_factory=lambda: deque(maxlen=RECENT_KEPT), repr=False)
    """The last POST bodies, decoded from JSON when they were JSON, else raw bytes."""
    _waiters: list[tuple[Callable[[ServerStats], bool], asyncio.Future[None]]] = field(
        default_factory=list, repr=False, compare=False
    )

    async def wait_for(
        self, predicate: Callable[[ServerStats], bool], timeout: float | None = 10.0
    ) -> None:
        """Return once ``predicate(self)`` holds; raise ``TimeoutError`` after ``timeout``."""
        if predicate(self):
            return
        waiter = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[1], timeout)
        finally:
            self._waiters.remove(waiter)

    def _notify(self) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate(self):
                future.set_result(None)

    def _count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


STATS = web.AppKey("modal_llm_server_stats", ServerStats)
CONFIG = web.AppKey("modal_llm_server_config", ServerConfig)


def toy_generate(prompt: str, *, echo_prompt: bool = False) -> str:
    """The stand-in for a model: the prompt's words upper-cased in reverse order.

    Deterministic and plainly not a model. The reply does not repeat the prompt (a reply
    without it crashed the old LangChain integration) unless ``echo_prompt`` is set, and
    it carries multibyte UTF-8 on purpose.
    """
    words = prompt.upper().split()
    text = f"🤖 toy reply — {' '.join(reversed(words)) if words else '(EMPTY PROMPT)'} ✓"
    return f"{prompt} {text}" if echo_prompt else text


def split_pieces(text: str, pieces: int) -> list[str]:
    """Split ``text`` into at most ``pieces`` non-empty deltas whose concatenation is ``text``."""
    count = max(1, min(pieces, len(text)))
    size = len(text)
    return [text[i * size // count : (i + 1) * size // count] for i in range(count)]


def _split_bytes(data: bytes, pieces: int) -> list[bytes]:
    count = max(1, min(pieces, len(data)))
    size = len(data)
    return [data[i * size // count : (i + 1) * size // count] for i in range(count)]


def _dumps(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message, headers=headers)


def _detail(status: int, detail: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=_dumps({"detail": detail}),
        content_type="application/json",
        headers=headers,
    )


def _is_json_type(content_type: str | None) -> bool:
    # FastAPI (strict_content_type, the default) parses the body only for
    # application/json and application/*+json; anything else validates as raw bytes.
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    main_type, _, subtype = mime.partition("/")
    return main_type == "application" and (subtype == "json" or subtype.endswith("+json"))


def _lax_bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    return None


def validate_body(
    raw: bytes, content_type: str | None, stream_flag: str = "stream"
) -> tuple[dict[str, Any] | None, web.Response | None]:
    """Validate a POST body as the FastAPI endpoint would; return the body or the error reply."""
    if not raw:
        error: dict[str, Any] = {
            "type": "missing",
            "loc": ["body"],
            "msg": "Field required",
            "input": None,
        }
        return None, _detail(422, [error])
    value: Any
    if _is_json_type(content_type):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            error = {
                "type": "json_invalid",
                "loc": ["body", exc.pos],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": exc.msg},
            }
            return None, _detail(422, [error])
        except (ValueError, RecursionError):  # not UTF-8, say: FastAPI's catch-all answers 400
            return None, _detail(400, "There was an error parsing the body")
    else:
        value = raw.decode("utf-8", "replace")
    if not isinstance(value, dict):
        error = {
            "type": "model_attributes_type",
            "loc": ["body"],
            "msg": "Input should be a valid dictionary or object to extract fields from",
            "input": value,
        }
        return None, _detail(422, [error])
    errors: list[dict[str, Any]] = []
    if "prompt" not in value:
        errors.append(
            {"type": "missing", "loc": ["body", "prompt"], "msg": "Field required", "input": value}
        )
    elif not isinstance(value["prompt"], str):
        errors.append(
            {
                "type": "string_type",
                "loc": ["body", "prompt"],
                "msg": "Input should be a valid string",
                "input": value["prompt"],
            }
        )
    if stream_flag in value:
        flag = value[stream_flag]
        if _lax_bool(flag) is None:
            parsing = isinstance(flag, (str, int, float)) and not isinstance(flag, bool)
            errors.append(
                {
                    "type": "bool_parsing" if parsing else "bool_type",
                    "loc": ["body", stream_flag],
                    "msg": "Input should be a valid boolean"
                    + (", unable to interpret input" if parsing else ""),
                    "input": flag,
                }
            )
    if "format" in value and value["format"] not in STREAM_FORMATS:
        expected = "'sse', 'ndjson', 'text' or 'json'"
        errors.append(
            {
                "type": "literal_error",
                "loc": ["body", "format"],
                "msg": f"Input should be {expected}",
                "input": value["format"],
                "ctx": {"expected": expected},
            }
        )
    if errors:
        return None, _detail(422, errors)
    return value, None


class _Endpoint:
    """The request handler and its state; one per application."""

    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        self.config = config
        self.stats = stats
        self._rng = random.Random(config.seed)
        self._post_number = 0
        self._poll_number = 0
        self._calls: dict[str, asyncio.Task[bytes]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._warm = config.cold_start <= 0
        self._boot: asyncio.Task[None] | None = None
        self._last_done = time.monotonic()
        self._closing = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        headers = request.headers.copy()
        stats.last_headers = headers
        stats.recent_headers.append(headers)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        stats._notify()
        try:
            resp = await self._dispatch(request)
            if not resp.prepared:  # streams count their status when they start
                stats._count(resp.status)
            return resp
        except web.HTTPException as exc:
            stats._count(exc.status)
            raise
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away (handler_cancellation).
            if not self._closing:
                stats.disconnects += 1
            raise
        finally:
            if task is not None:
                self._handlers.discard(task)
            stats.in_flight -= 1
            self._last_done = time.monotonic()
            stats._notify()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        method = request.method
        raw = b""
        if method == "POST":
            self.stats.posts += 1
            raw = await request.read()
            try:
                self.stats.bodies.append(json.loads(raw))
            except (ValueError, RecursionError):
                self.stats.bodies.append(raw)
        elif method == "GET":
            self.stats.gets += 1

        if config.modal_key is not None and config.modal_secret is not None:
            denied = _check_credentials(request, config.modal_key, config.modal_secret)
            if denied is not None:
                return denied

        call_id = request.query.get(RESULT_QUERY)
        if method == "GET" and call_id is not None:
            return await self._poll(request, call_id)
        if method != "POST":
            return _detail(405, "Method Not Allowed", {"Allow": "POST"})

        fault = self._post_fault()
        if fault is not None:
            return fault
        if not self._warm or config.idle_reset > 0:
            await self._warm_up()

        body, invalid = validate_body(raw, request.headers.get("Content-Type"), config.stream_flag)
        if invalid is not None:
            return invalid
        assert body is not None
        if config.latency > 0:
            await asyncio.sleep(config.latency)

        prompt: str = body["prompt"]
        stream_format = body.get("format", config.stream_format)
        if _lax_bool(body.get(config.stream_flag, False)) and stream_format != "json":
            return await self._stream(request, prompt, stream_format)
        return await self._complete(request, prompt)

    def _post_fault(self) -> web.Response | None:
        config = self.config
        self._post_number += 1
        number = self._post_number
        # Always draw both numbers so that a seed fixes the sequence whatever is switched on.
        rate_draw = self._rng.random()
        fail_draw = self._rng.random()
        if number <= config.error_burst:
            return self._error(config.error_status)
        if (
            config.rate_limit_every and number % config.rate_limit_every == 0
        ) or rate_draw < config.rate_limit_rate:
            return self._error(429)
        if fail_draw < config.failure_rate:
            return _text(500, INTERNAL_ERROR)
        return None

    def _error(self, status: int) -> web.Response:
        retry_after = self.config.retry_after
        headers = {"Retry-After": retry_after} if status == 429 and retry_after else None
        return _status_text(status, headers)

    async def _warm_up(self) -> None:
        config = self.config
        if config.cold_start <= 0:
            return
        if (
            self._warm
            and config.idle_reset > 0
            and self.stats.in_flight == 1
            and time.monotonic() - self._last_done >= config.idle_reset
        ):
            self._warm = False
        if self._warm:
            return
        if self._boot is None:
            self.stats.cold_starts += 1
            self._boot = self._spawn(asyncio.sleep(config.cold_start))
            self._boot.add_done_callback(self._booted)
        # Requests that arrive during a cold start share it; a client leaving doesn't stop it.
        await asyncio.shield(self._boot)

    def _booted(self, task: asyncio.Task[None]) -> None:
        self._boot = None
        if not task.cancelled():
            self._warm = True

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _reply(self, prompt: str) -> bytes:
        text = toy_generate(prompt, echo_prompt=self.config.echo_prompt)
        usage = {"prompt_chars": len(prompt), "completion_chars": len(text)}
        return _dumps({"prompt": text, "model": "toy", "usage": usage})

    async def _work(self, prompt: str) -> bytes:
        self.stats.generations_started += 1
        self.stats._notify()
        if self.config.work_time > 0:
            await asyncio.sleep(self.config.work_time)
        self.stats.generations_finished += 1
        self.stats._notify()
        return self._reply(prompt)

    async def _complete(self, request: web.Request, prompt: str) -> web.Response:
        if self.config.work_time <= self.config.hop_time:
            return _json_reply(await self._work(prompt))
        # Modal: the call runs once, in the background; the POST blocks up to one hop, then
        # answers 303 to a result URL that any number of GETs can wait on.
        call_id = f"fc-{uuid.uuid4().hex}"
        self._calls[call_id] = self._spawn(self._work(prompt))
        return await self._await_result(request, call_id)

    async def _poll(self, request: web.Request, call_id: str) -> web.Response:
        if call_id not in self._calls:
            return _text(404, INVALID_CALL)
        self._poll_number += 1
        every = self.config.poll_error_every
        if every and self._poll_number % every == 0:
            return self._error(self.config.error_status)
        return await self._await_result(request, call_id)

    async def _await_result(self, request: web.Request, call_id: str) -> web.Response:
        task = self._calls[call_id]
        # asyncio.wait never cancels the work, even when this request is cancelled.
        await asyncio.wait({task}, timeout=self.config.hop_time)
        if not task.done():
            location = request.url.update_query({RESULT_QUERY: call_id})
            return web.Response(status=303, headers={"Location": str(location)})
        # Modal hands out a result once; later GETs of the URL are 404.
        if self._calls.pop(call_id, None) is None:
            return _text(404, INVALID_CALL)
        return _json_reply(task.result())

    def _stream_chunks(self, prompt: str, stream_format: str) -> tuple[list[bytes], bytes, bytes]:
        """Return (chunk per piece, terminator, error chunk) for one streamed reply."""
        config = self.config
        text = toy_generate(prompt, echo_prompt=config.echo_prompt)
        error = {"error": "toy generator failed mid-stream"}
        if stream_format == "text":
            if config.split_utf8:
                return _split_bytes(text.encode(), config.pieces), b"", b""
            return [piece.encode() for piece in split_pieces(text, config.pieces)], b"", b""
        pieces = split_pieces(text, config.pieces)
        if stream_format == "ndjson":
            return [_dumps({"prompt": p}) + b"\n" for p in pieces], b"", _dumps(error) + b"\n"
        every = config.sse_comment_every
        chunks = [
            (_KEEPALIVE if every and i % every == 0 else b"")
            + b"data: "
            + _dumps({"prompt": piece})
            + b"\n\n"
            for i, piece in enumerate(pieces)
        ]
        terminator = b"" if config.stream_no_terminator else _DONE
        return chunks, terminator, b"event: error\ndata: " + _dumps(error) + b"\n\n"

    async def _stream(
        self, request: web.Request, prompt: str, stream_format: str
    ) -> web.StreamResponse:
        config = self.config
        stats = self.stats
        chunks, terminator, error = self._stream_chunks(prompt, stream_format)
        stats.generations_started += 1
        resp = web.StreamResponse(
            headers={"Content-Type": _CONTENT_TYPES[stream_format], "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        stats._count(200)
        stats._notify()
        try:
            for index, chunk in enumerate(chunks):
                if index == config.stream_drop_after:
                    return _drop(request, resp)
                if index == config.stream_error_after:
                    if not error:
                        return _drop(request, resp)
                    await resp.write(error)
                    return resp
                if index > 0:
                    if index == 1 and config.gate is not None:
                        await config.gate.wait()
                    if config.piece_delay > 0:
                        await asyncio.sleep(config.piece_delay)
                await resp.write(chunk)
            if len(chunks) == config.stream_drop_after:
                return _drop(request, resp)
            if len(chunks) == config.stream_error_after and error:
                await resp.write(error)
                return resp
            if terminator:
                await resp.write(terminator)
        except ConnectionResetError:
            # The client went away; returning lets aiohttp finish quietly.
            if not self._closing:
                stats.disconnects += 1
            return resp
        stats.generations_finished += 1
        return resp

    async def on_shutdown(self, app: web.Application) -> None:
        """Stop everything still running so that cleanup is prompt and leaves no tasks."""
        self._closing = True
        current = asyncio.current_task()
        for task in list(self._handlers):
            if task is not current:
                task.cancel()
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._calls.clear()


def _check_credentials(request: web.Request, key: str, secret: str) -> web.Response | None:
    sent_key = request.headers.get("Modal-Key")
    sent_secret = request.headers.get("Modal-Secret")
    if sent_key is None or sent_secret is None:
        return _text(401, MISSING_CREDENTIALS)
    key_ok = hmac.compare_digest(sent_key.encode(), key.encode())
    secret_ok = hmac.compare_digest(sent_secret.encode(), secret.encode())
    if not (key_ok and secret_ok):
        return _text(401, INVALID_CREDENTIALS)
    return None


def _status_text(status: int, headers: dict[str, str] | None = None) -> web.Response:
    try:
        reason = HTTPStatus(status).phrase.lower()
    except ValueError:
        reason = "error"
    return _text(status, f"modal-http: {reason}", headers)


def _json_reply(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _drop(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    # close() flushes what was written, then ends the connection mid-body: the client sees
    # an incomplete chunked reply, the way a crashed container's stream ends.
    if request.transport is not None:
        request.transport.close()
    return resp


def create_app(config: ServerConfig | None = None) -> web.Application:
    """Build the endpoint application; its stats are at ``app[STATS]``.

    Run it with :func:`serve` or ``aiohttp.test_utils.TestServer(app)``. Both turn on
    aiohttp's handler cancellation; without it, a client that leaves while the server
    waits is only noticed (and counted in ``disconnects``) at the next write.
    """
    config = config if config is not None else ServerConfig()
    stats = ServerStats()
    endpoint = _Endpoint(config, stats)
    app = web.Application()
    app[CONFIG] = config
    app[STATS] = stats
    # Modal URLs have a path of their own: answer on every path.
    app.router.add_route("*", "/{tail:.*}", endpoint.handle)
    app.on_shutdown.append(endpoint.on_shutdown)
    return app


def _base_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


@contextlib.asynccontextmanager
async def serve(
    config: ServerConfig | web.Application | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[str]:
    """Run the endpoint (from a config, or an app from :func:`create_app`); yield its base URL.

    Usage::

        async with serve(ServerConfig(pieces=4)) as url:  # "http://127.0.0.1:PORT/"
            ...
    """
    app = config if isinstance(config, web.Application) else create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        # A deep backlog: benchmarks open hundreds of connections at once.
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        yield _base_url(host, runner.addresses[0][1])
    finally:
        # Stop accepting first, then let the loop finish any accept already under way so
        # that cleanup sees (and closes) its connection instead of leaking the socket.
        for running in list(runner.sites):
            await running.stop()
        # asyncio finishes an accept in a task of its own, a few loop turns later.
        await asyncio.sleep(0.01)
        await runner.cleanup()


def build_parser(*, add_help: bool = True) -> argparse.ArgumentParser:
    """The command line of ``python -m modal_llm.server`` and ``modal-llm serve``.

    ``add_help=False`` makes it usable as a ``parents=[...]`` parser for a subcommand.
    """
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="modal-llm serve",
        add_help=add_help,
        description="Run the reference Modal LLM endpoint (a toy generator, not a model). "
        "Prints its URL on one line once it is ready.",
    )
    add = parser.add_argument

    def seconds(flag: str, default: float, text: str) -> None:
        add(flag, type=float, default=default, metavar="SECONDS", help=text)

    def count(flag: str, text: str, default: int | None = 0) -> None:
        add(flag, type=int, default=default, metavar="N", help=text)

    def fraction(flag: str, text: str) -> None:
        add(flag, type=float, default=0.0, metavar="P", help=text)

    def switch(flag: str, text: str) -> None:
        add(flag, action="store_true", help=text)

    add("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    add("--port", type=int, default=8000, help="port, 0 for any free one (default: %(default)s)")
    switch("--uvloop", "run on uvloop if it is installed")
    count("--pieces", "pieces per streamed reply (default: %(default)s)", defaults.pieces)
    seconds("--piece-delay", 0.0, "pause between streamed pieces")
    seconds("--latency", 0.0, "delay before each answer (time to first byte)")
    seconds("--cold-start", 0.0, "extra delay for the first request")
    seconds("--idle-reset", 0.0, "idle time after which the next request is cold again")
    add(
        "--stream-format",
        choices=STREAM_FORMATS,
        default=defaults.stream_format,
        help="what a streaming request gets (default: %(default)s)",
    )
    count("--rate-limit-every", "every Nth POST gets 429")
    fraction("--rate-limit-rate", "this fraction of POSTs gets 429, at random")
    add("--retry-after", metavar="VALUE", help="Retry-After on 429: seconds or an HTTP date")
    count("--error-burst", "the first N POSTs get --error-status")
    add(
        "--error-status",
        type=int,
        default=defaults.error_status,
        metavar="STATUS",
        help="status of --error-burst and --poll-error-every (default: %(default)s)",
    )
    fraction("--failure-rate", 'this fraction of POSTs gets 500 "modal-http: internal error"')
    add("--modal-key", metavar="KEY", help="require this Modal-Key (with --modal-secret)")
    add("--modal-secret", metavar="SECRET", help="require this Modal-Secret (test values only)")
    seconds("--work-time", 0.0, "simulated generation time of a non-streaming reply")
    seconds("--hop-time", defaults.hop_time, "longest block before a 303 (default: %(default)s)")
    count("--poll-error-every", "every Nth GET of a result URL gets --error-status")
    add(
        "--stream-flag",
        default=defaults.stream_flag,
        metavar="KEY",
        help="body key that asks for a stream (default: %(default)s)",
    )
    count("--sse-comment-every", "SSE: a keep-alive comment before every Nth piece")
    count("--stream-drop-after", "drop the connection after N pieces", None)
    count("--stream-error-after", "send an error after N pieces", None)
    switch("--stream-no-terminator", "SSE streams end without data: [DONE]")
    switch("--split-utf8", "text streams cut multibyte characters across chunks")
    switch("--echo-prompt", "replies start with the prompt")
    add("--seed", type=int, default=0, help="seed of the random faults (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build a :class:`ServerConfig` from :func:`build_parser`'s namespace."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig) if f.name != "gate"
    }
    return ServerConfig(**values)


async def _serve_forever(config: ServerConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not on Windows, nor outside the main thread: Ctrl-C still ends the run there.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    async with serve(config, host, port) as url:
        # Handlers first, then the URL: whoever reads it may signal us at once.
        print(url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the endpoint in the foreground until SIGINT or SIGTERM; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"modal-llm serve: error: {exc}", file=sys.stderr)
        return 2
    coro = _serve_forever(config, args.host, args.port)
    try:
        if args.uvloop:
            try:
                import uvloop
            except ImportError:
                print("modal-llm serve: uvloop is not installed; using asyncio", file=sys.stderr)
            else:
                uvloop.run(coro)
                return 0
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"modal-llm serve: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
