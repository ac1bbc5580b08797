"""The wire faults a review found after issue 10, one test (or a few) per kind, over real
loopback HTTP: a raw asyncio server where the fault is below what aiohttp's server allows
(a stalled chunk, a cut or undecodable body), else a small aiohttp app.

Each failed on the send path before the fix it names; each drives both consumers of the
one send path (``generate()`` and ``stream()``) where the fault applies to both.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    Client,
    ConfigError,
    ConnectError,
    ContractError,
    ModalLLMError,
    PoolTimeoutError,
    RetryPolicy,
    ServerError,
    ServerStreamError,
    StatusError,
    StreamInterruptedError,
    Timeout,
)

from ..conftest import MakeEndpoint

GUARD = 10.0
"""Outer bound on calls that must end far sooner: reaching it means a hang."""
NO_RETRY = RetryPolicy(max_retries=0)

Handler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, str, dict[str, str], int], Awaitable[None]
]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length:
        await reader.readexactly(length)
    return head[0], headers


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A one-request-per-connection HTTP server whose ``handler`` writes raw bytes."""
    count = 0
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            line, headers = await _read_request(reader)
            count += 1
            await handler(reader, writer, line, headers, count)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def head(status: int, headers: dict[str, str], *, chunked: bool = False) -> bytes:
    fields = {"Connection": "close", **headers}
    if chunked:
        fields["Transfer-Encoding"] = "chunked"
    lines = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"HTTP/1.1 {status} X\r\n{lines}\r\n".encode()


def whole(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    return head(status, {"Content-Length": str(len(body)), **(headers or {})}) + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def run(client: AsyncClient, path: str) -> str:
    """The text of one call through ``generate()`` or ``stream()``."""
    if path == "generate":
        return await asyncio.wait_for(client.generate("hi"), GUARD)

    async def read() -> str:
        async with client.stream("hi") as pieces:
            return "".join([piece async for piece in pieces])

    return await asyncio.wait_for(read(), GUARD)


PATHS = pytest.mark.parametrize("path", ["generate", "stream"])


# -- a stream collected while open frees its slot, whatever the warning filter does --------------


async def endless(request: web.Request) -> web.StreamResponse:
    if not request.headers.get("Accept", "").startswith("text/event-stream"):
        return web.json_response({"prompt": "unary"})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    while True:
        await resp.write(b'data: {"prompt": "more"}\n\n')
        await asyncio.sleep(0.01)  # pacing a never-ending stream


async def test_a_collected_stream_frees_its_slot_when_warnings_are_recorded(
    make_endpoint: MakeEndpoint,
) -> None:
    async with AsyncClient(await make_endpoint(endless), max_concurrency=1) as c:
        with warnings.catch_warnings(record=True) as seen:  # as -W always / -X dev keep them
            warnings.simplefilter("always")
            stream = c.stream("go")
            async for _ in stream:
                break
            del stream
            gc.collect()
        (warning,) = [w for w in seen if issubclass(w.category, ResourceWarning)]
        assert "garbage-collected while still open" in str(warning.message)
        assert warning.source is None  # a recorded source would keep the stream alive
        # The slot came back at once: a bounded wait for it succeeds.
        assert await c.generate("hi", timeout=Timeout(pool=GUARD)) == "unary"


# -- an error body that stalls keeps its status, excerpt and Retry-After ------------------------


@PATHS
async def test_a_stalled_error_body_keeps_its_status_and_is_retried(path: str) -> None:
    stall = asyncio.Event()

    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        if n == 1:
            headers = {"Content-Type": "text/plain", "Retry-After": "0"}
            writer.write(head(503, headers, chunked=True) + chunk(b"modal-http: first part"))
            await writer.drain()
            await stall.wait()  # never set: the rest of the body never comes
        else:
            writer.write(whole(200, b'{"prompt": "ok"}', {"Content-Type": "application/json"}))

    async with raw_server(handler) as url:
        async with AsyncClient(url, timeout=Timeout(read=0.2), retry=NO_RETRY) as c:
            with pytest.raises(ServerError) as info:
                await run(c, path)
            error = info.value
            assert (error.status_code, error.retry_after) == (503, 0)
            assert error.body_excerpt == "modal-http: first part"
        # Retried as a 503 is: the next attempt gets the answer.
        async with AsyncClient(url, timeout=Timeout(read=0.2)) as c:
            assert await run(c, path) == "ok"


# -- one content-type rule for both paths -------------------------------------------------------

HTML = b"<!DOCTYPE html><html><body>Sign in</body></html>"


@PATHS
@pytest.mark.parametrize(
    ("content_type", "body", "says"),
    [
        ("application/xml", b"<?xml version='1.0'?><a/>", "application/xml, none of the"),
        ("application/octet-stream", b"\x00\x01binary", "application/octet-stream, none of"),
        (None, HTML, r"HTML page \(sent without a Content-Type\)"),
        ("text/plain", b"\n  <html><body>Sign in</body></html>", r"HTML page \(sent as text/plain"),
        ("text/plain; charset=utf-8", HTML, r"HTML page \(sent as text/plain"),
    ],
)
async def test_non_contract_replies_are_refused_on_both_paths(
    path: str, content_type: str | None, body: bytes, says: str
) -> None:
    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        writer.write(whole(200, body, {"Content-Type": content_type} if content_type else {}))

    async with raw_server(handler) as url, AsyncClient(url, retry=NO_RETRY) as c:
        with pytest.raises(ContractError, match=says) as info:
            await run(c, path)
    assert info.value.url == url


async def test_plain_text_still_streams_and_json_as_text_still_parses() -> None:
    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        if h.get("accept", "").startswith("text/event"):
            writer.write(whole(200, b"<b>bold</b> text", {"Content-Type": "text/plain"}))
        else:
            writer.write(whole(200, b'{"prompt": "json"}', {"Content-Type": "text/plain"}))

    async with raw_server(handler) as url, AsyncClient(url, retry=NO_RETRY) as c:
        assert await run(c, "stream") == "<b>bold</b> text"  # text, not an HTML document
        assert await run(c, "generate") == "json"


# -- every credential-like value the client sent is masked wherever it is echoed ----------------

QUERY_SECRET, API_KEY, COOKIE, BEARER, CALL_TOKEN = (
    "QSECRETVALUE",
    "APIKEYVALUE",
    "COOKIEVAL",
    "BEARERTOK",
    "CALLTOKENVAL",
)
ECHOED = (QUERY_SECRET, API_KEY, COOKIE, BEARER, CALL_TOKEN, "ws-echo-secret")


def assert_masked(error: BaseException) -> None:
    texts = [str(error), repr(error), json.dumps(vars(error), default=str)]
    for value in ECHOED:
        assert not any(value in text for text in texts), (value, texts)


@PATHS
async def test_echoed_credentials_of_every_kind_are_masked(path: str) -> None:
    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        echo = f"bad request: {line} {json.dumps(h)}".encode()
        echoed = {"Content-Type": "text/plain", "X-Echo": f"key {h.get('x-api-key')}"}
        writer.write(whole(400, echo, echoed))

    headers = {"X-Api-Key": API_KEY, "Cookie": f"s={COOKIE}", "Authorization": f"Basic {BEARER}"}
    async with raw_server(handler) as url:
        options: dict[str, Any] = {"headers": headers, "retry": NO_RETRY}
        async with AsyncClient(
            f"{url}?token={QUERY_SECRET}",
            modal_key="wk-echo",
            modal_secret="ws-echo-secret",
            **options,
        ) as c:
            with pytest.raises(StatusError) as info:
                if path == "stream":
                    async with c.stream("hi", headers={"X-Auth-Token": CALL_TOKEN}) as pieces:
                        async for _ in pieces:
                            pass
                else:
                    await c.generate("hi", headers={"X-Auth-Token": CALL_TOKEN})
    assert "token=***" in info.value.body_excerpt  # the echo is there, its values are not
    assert info.value.headers["x-echo"] == "key ***"
    assert_masked(info.value)


# -- a body that cannot be decoded is a ContractError with its status, never retried -----------


@PATHS
async def test_an_undecodable_body_is_a_contract_error(path: str) -> None:
    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        writer.write(whole(200, b"\x1f\x8b\x08\x00garbage-not-gzip", headers))

    async with raw_server(handler) as url, AsyncClient(url) as c:  # default retries
        with pytest.raises(ContractError, match="cannot be decoded as 'gzip'") as info:
            await run(c, path)
    assert info.value.status_code == 200
    assert info.value.attempts == 1  # not a network error: not retried
    assert "400" not in str(info.value)


# -- a body cut short says so, with the bytes (and pieces) that came, no fake 400 ---------------


async def test_a_unary_body_cut_short_counts_its_bytes() -> None:
    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        headers = {"Content-Type": "application/json", "Content-Length": "100"}
        writer.write(head(200, headers) + b'{"prompt": "abc')

    async with raw_server(handler) as url, AsyncClient(url, retry=NO_RETRY) as c:
        with pytest.raises(ConnectError) as info:
            await c.generate("hi")
    assert info.value.message == "the connection closed mid-body after 15 of 100 bytes"
    assert not info.value.before_response


async def test_a_stream_cut_after_a_piece_counts_its_bytes_and_pieces() -> None:
    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        event = b'data: {"prompt": "a"}\n\n'
        writer.write(head(200, {"Content-Type": "text/event-stream"}, chunked=True) + chunk(event))
        await writer.drain()
        writer.transport.abort()

    async with raw_server(handler) as url, AsyncClient(url, retry=NO_RETRY) as c:
        with pytest.raises(StreamInterruptedError) as info:
            await run(c, "stream")
    error = info.value
    assert error.message == (
        "stream interrupted after 1 piece: the connection closed mid-body after 23 bytes"
    )
    assert (error.ended_by, error.partial_text) == ("connection", "a")
    assert (error.url, error.attempts) == (url, 1)


# -- errors raised mid-stream carry .url and .attempts --------------------------------------------


@pytest.mark.parametrize(
    ("body", "error", "says"),
    [
        (b'data: {"prompt": "a"}\n\nevent: error\ndata: boom\n\n', ServerStreamError, "boom"),
        (b'data: {"prompt": "a"}\n\ndata: {"prompt": "b', StreamInterruptedError, "middle of"),
        (b'data: {"prompt": "a"}\n\ndata: [1]\n\n', None, None),
    ],
)
async def test_stream_errors_carry_url_and_attempts(
    body: bytes, error: type[ModalLLMError] | None, says: str | None
) -> None:
    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        if n == 1:  # one retried failure first: attempts counts it
            writer.write(whole(503, b"busy", {"Retry-After": "0"}))
        else:
            writer.write(whole(200, body, {"Content-Type": "text/event-stream"}))

    async with (
        raw_server(handler) as url,
        AsyncClient(f"{url}?k=QSECRETVALUE", stream_require_done=False) as c,
    ):
        if error is None:
            assert await run(c, "stream") == "a[1]"
            return
        with pytest.raises(error, match=says) as info:
            await run(c, "stream")
    assert info.value.url == f"{url}?k=***"
    assert info.value.attempts == 2
    assert f"from {url}?k=***" in str(info.value)


# -- a half line at EOF is an interruption in every line format ---------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-ndjson", b'{"prompt": "Hello"}\n{"prompt": " wo'),
        ("text/event-stream", b'data: {"prompt": "Hello"}\n\ndata: {"prompt": " wo'),
    ],
)
async def test_a_half_line_at_eof_is_an_interruption_with_partial_text(
    content_type: str, body: bytes
) -> None:
    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        writer.write(head(200, {"Content-Type": content_type}) + body)

    async with (
        raw_server(handler) as url,
        AsyncClient(url, retry=NO_RETRY, stream_require_done=False) as c,
    ):
        with pytest.raises(StreamInterruptedError, match="middle of a line") as info:
            await run(c, "stream")
    assert (info.value.partial_text, info.value.ended_by) == ("Hello", "eof")


# -- an empty secret counts as missing ------------------------------------------------------------


def test_an_empty_secret_or_key_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODAL_LLM_KEY", raising=False)
    monkeypatch.delenv("MODAL_LLM_SECRET", raising=False)
    url = "http://127.0.0.1:9/"
    with pytest.raises(ConfigError, match="modal_key was passed but not modal_secret"):
        AsyncClient(url, modal_key="k", modal_secret="")
    with pytest.raises(ConfigError, match="modal_secret was passed but not modal_key"):
        AsyncClient(url, modal_key="", modal_secret="s")
    monkeypatch.setenv("MODAL_LLM_KEY", "wk-env")
    with pytest.raises(ConfigError, match=r"\$MODAL_LLM_SECRET is not"):
        AsyncClient(url, modal_secret="")


# -- messages --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503, 504])
async def test_a_retry_after_over_the_cap_is_shown_for_every_status(status: int) -> None:
    async def handler(r: Any, writer: asyncio.StreamWriter, line: str, h: Any, n: int) -> None:
        writer.write(whole(status, b"busy", {"Retry-After": "500"}))

    async with raw_server(handler) as url, AsyncClient(url) as c:
        with pytest.raises(StatusError) as info:
            await c.generate("hi")
    assert info.value.attempts == 1  # over max_retry_after: raised at once
    assert str(info.value).endswith(": (retry after 500s) busy")


def test_a_pool_timeout_through_the_blocking_client_names_its_stream_form() -> None:
    from modal_llm.testing import LocalEndpoint

    with (
        LocalEndpoint(pieces=50, piece_delay=0.05) as endpoint,
        Client(endpoint.url, max_concurrency=1) as client,
    ):
        pieces = client.stream("go")
        next(pieces)
        with pytest.raises(PoolTimeoutError, match=r"\.close\(\) on Client\.stream\(\)"):
            client.generate("hi", timeout=Timeout(pool=0.05))
        pieces.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://[::1]]:80/", "'http://[::1]]:80/'"),
        ("http://example.com/a\nb", "'http://example.com/a\\nb'"),
        (
            "http://u:pw@example.com:99999/?token=SECRET",
            "'http://***@example.com:99999/?token=***'",
        ),
    ],
)
def test_a_bad_url_is_quoted_as_typed(url: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        AsyncClient(url)
    assert f"endpoint URL {shown}" in str(info.value)
    assert "SECRET" not in str(info.value) and "pw" not in str(info.value)
