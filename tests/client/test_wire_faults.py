"""The wire faults of issue 10, one test (or a few) per kind, over real loopback HTTP.

Each of these failed against the two-pipeline client it replaced; each now exercises the
one send path (``modal_llm._send``) from both of its consumers where that applies.
"""

from __future__ import annotations

import asyncio
import gc
import json
import pickle
import tracemalloc
import zlib
from typing import Any

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    AuthenticationError,
    ContractError,
    PoolTimeoutError,
    ReplyTooLargeError,
    RetryPolicy,
    ServerError,
    ServerStreamError,
    StatusError,
    StreamError,
    StreamInterruptedError,
    Timeout,
)

from ..conftest import MakeEndpoint

KEY, SECRET = "wk-echo-key-123", "ws-echo-secret-456"
GUARD = 10.0
"""Outer bound on calls that must end far sooner: reaching it means a hang."""


def sse_event(text: str) -> bytes:
    return f"data: {json.dumps({'prompt': text})}\n\n".encode()


async def streamed(request: web.Request, content_type: str, chunks: list[bytes]) -> Any:
    resp = web.StreamResponse(headers={"Content-Type": content_type})
    await resp.prepare(request)
    for chunk in chunks:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


# -- 1. the stream byte cap counts the whole body, the opening included ----------------------


async def test_stream_cap_counts_from_the_first_body_byte(make_endpoint: MakeEndpoint) -> None:
    event = sse_event("x" * 40)  # 62 bytes
    assert len(event) == 62
    asked: list[asyncio.Event] = [asyncio.Event() for _ in range(4)]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for gate in asked:  # one event per chunk: the next only once the last was read
            await resp.write(event)
            await gate.wait()
        await resp.write_eof()
        return resp

    pieces: list[str] = []
    async with AsyncClient(await make_endpoint(handler), max_reply_bytes=100) as c:
        with pytest.raises(StreamError, match="max_reply_bytes=100") as info:
            async with c.stream("hi") as stream:
                async for piece in stream:
                    pieces.append(piece)
                    asked[len(pieces) - 1].set()
    assert pieces == ["x" * 40]  # 62 bytes fit; the chunk that crosses 100 is refused
    assert info.value.partial_text == "x" * 40  # after a piece: a StreamError (review R1)
    assert isinstance(info.value.__cause__, ReplyTooLargeError)


# -- 2. credentials echoed back are masked in every error, whatever path raised it ---------------


@pytest.mark.parametrize(
    ("content_type", "chunks", "error"),
    [
        (
            "application/x-ndjson",
            [b'{"prompt": "a"}\n', f"not json {SECRET} {KEY}\n".encode()],
            StreamError,  # after a piece; caused by the ContractError (review R1)
        ),
        (
            "text/event-stream",
            [sse_event("a"), f"event: error\ndata: {SECRET} {KEY}\n\n".encode()],
            ServerStreamError,
        ),
        ("text/event-stream", [f"event: error\ndata: {SECRET}\n\n".encode()], ServerStreamError),
        ("application/json", [f'{{"no": "{SECRET}"}}'.encode()], ContractError),
    ],
)
async def test_echoed_credentials_are_masked_in_stream_errors(
    make_endpoint: MakeEndpoint, content_type: str, chunks: list[bytes], error: type[Exception]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await streamed(request, content_type, chunks)

    async with AsyncClient(await make_endpoint(handler), modal_key=KEY, modal_secret=SECRET) as c:
        with pytest.raises(error) as info:
            async with c.stream("hi") as stream:
                async for _ in stream:
                    pass
    err = info.value
    texts = [str(err), repr(err), *(v for v in vars(err).values() if isinstance(v, str))]
    texts += [str(a) for a in err.args]
    for text in texts:
        assert SECRET not in text and KEY not in text, text
    assert any("***" in text for text in texts)


async def test_echoed_credentials_are_masked_on_a_poll(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.method == "POST":
            raise web.HTTPSeeOther(location="/result")
        return web.Response(status=400, text=f"bad poll with {request.headers['Modal-Secret']}")

    async with AsyncClient(await make_endpoint(handler), modal_key=KEY, modal_secret=SECRET) as c:
        with pytest.raises(StatusError) as info:
            await c.generate("hi")
    assert SECRET not in str(info.value) and "***" in info.value.body_excerpt


# -- 3. the cap applies to decoded bytes, with memory bounded by it ------------------------------

CAP = 1024 * 1024


def gzip_bomb(prefix: bytes, size: int, suffix: bytes) -> bytes:
    """``prefix + b"a" * size + suffix`` gzip-compressed, without building it in memory."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(prefix)]
    block = b"a" * CAP
    for start in range(0, size, CAP):
        parts.append(packer.compress(block[: size - start]))
    parts += [packer.compress(suffix), packer.flush()]
    return b"".join(parts)


BOMB = gzip_bomb(b'{"prompt": "', 64 * CAP, b'"}')  # about 65 KB that inflate to 64 MiB


def bomb_handler(*, via_303: bool = False, content_type: str = "application/json") -> Any:
    async def handler(request: web.Request) -> web.Response:
        if via_303 and request.method == "POST":
            raise web.HTTPSeeOther(location="/result")
        return web.Response(
            body=BOMB, headers={"Content-Encoding": "gzip", "Content-Type": content_type}
        )

    return handler


@pytest.mark.parametrize(
    ("path", "handler"),
    [
        ("generate", bomb_handler()),
        ("poll", bomb_handler(via_303=True)),
        ("stream", bomb_handler(content_type="text/plain")),
        ("stream", bomb_handler()),
    ],
    ids=["unary", "303-poll", "stream-text", "stream-json"],
)
async def test_decoded_size_is_capped_in_bounded_memory(
    make_endpoint: MakeEndpoint, path: str, handler: Any
) -> None:
    assert len(BOMB) < 100_000
    url = await make_endpoint(handler)
    async with AsyncClient(url, max_reply_bytes=CAP) as c:
        tracemalloc.start()
        try:
            # (a text stream delivers a piece first: then a StreamError caused by it)
            with pytest.raises((ReplyTooLargeError, StreamError), match="max_reply_bytes") as info:
                if path == "stream":
                    async with c.stream("hi") as stream:
                        async for _ in stream:
                            pass
                else:
                    await asyncio.wait_for(c.generate("hi"), GUARD)
            _, peak = tracemalloc.get_traced_memory()
            error = info.value
            assert isinstance(
                error.__cause__ if isinstance(error, StreamError) else error, ReplyTooLargeError
            )
        finally:
            tracemalloc.stop()
    assert peak < 8 * CAP, f"peak {peak / CAP:.1f} MiB for a {CAP / CAP:.0f} MiB cap"


async def test_a_compressed_reply_within_the_cap_is_read(make_endpoint: MakeEndpoint) -> None:
    body = gzip_bomb(b'{"prompt": "', CAP // 2, b'"}')

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    async with AsyncClient(await make_endpoint(handler), max_reply_bytes=CAP) as c:
        assert await c.generate("hi") == "a" * (CAP // 2)


# -- 4. an error excerpt is read until its limit or the end of the body -----------------------


async def slow_401(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=401, headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    await resp.write(b"modal-http: ")
    await asyncio.sleep(0.05)  # pacing the server, so the body arrives in two chunks
    await resp.write(b"missing credentials for proxy authorization")
    await resp.write_eof()
    return resp


@pytest.mark.parametrize("path", ["generate", "stream"])
async def test_error_excerpt_is_read_past_the_first_chunk(
    make_endpoint: MakeEndpoint, path: str
) -> None:
    async with AsyncClient(await make_endpoint(slow_401)) as c:
        with pytest.raises(AuthenticationError) as info:
            if path == "stream":
                async with c.stream("hi") as stream:
                    async for _ in stream:
                        pass
            else:
                await c.generate("hi")
    assert info.value.body_excerpt == "modal-http: missing credentials for proxy authorization"


# -- 5. Retry-After is read on every status; 7. StatusError.headers -----------------------------


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
async def test_retry_after_is_honoured_on_every_retryable_status(
    make_endpoint: MakeEndpoint, status: int
) -> None:
    sent: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        sent.append(request.method)
        if len(sent) == 1:
            return web.Response(status=status, headers={"Retry-After": "2"}, text="later")
        return web.json_response({"prompt": "ok"})

    url = await make_endpoint(handler)
    # A Retry-After beyond max_retry_after is refused at once: proof that it was read.
    strict = RetryPolicy(max_retry_after=1.0, wait_initial=0, wait_max=0, jitter=0)
    async with AsyncClient(url, retry=strict) as c:
        with pytest.raises(StatusError) as info:
            await c.generate("hi")
    assert info.value.retry_after == 2.0
    assert info.value.attempts == 1 and sent == ["POST"]
    assert info.value.headers["retry-after"] == "2"


async def test_status_error_headers_are_a_read_only_case_insensitive_mapping(
    make_endpoint: MakeEndpoint,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=502,
            text="bad gateway",
            headers={"Retry-After": "3", "Set-Cookie": "session=abc", "X-Trace": "t1"},
        )

    async with AsyncClient(await make_endpoint(handler), max_retries=0) as c:
        with pytest.raises(ServerError) as info:
            await c.generate("hi")
    headers = info.value.headers
    assert headers["retry-after"] == headers["RETRY-AFTER"] == headers.get("Retry-After") == "3"
    assert "x-trace" in headers and headers["set-cookie"] == "***"
    with pytest.raises(TypeError):
        headers["Retry-After"] = "0"  # type: ignore[index]
    assert json.loads(json.dumps(headers))["Retry-After"] == "3"
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.headers["retry-after"] == "3" and str(copy) == str(info.value)


# -- 6. a byte-order mark is accepted and dropped on every path ---------------------------------


@pytest.mark.parametrize("path", ["generate", "stream"])
async def test_a_json_reply_may_start_with_a_bom(make_endpoint: MakeEndpoint, path: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=b'\xef\xbb\xbf{"prompt": "hello"}', content_type="application/json"
        )

    async with AsyncClient(await make_endpoint(handler)) as c:
        if path == "stream":
            async with c.stream("hi") as stream:
                assert [piece async for piece in stream] == ["hello"]
        else:
            assert await c.generate("hi") == "hello"


# -- 8. one content-type rule for both paths: an HTML page is not an answer ---------------------


@pytest.mark.parametrize("path", ["generate", "stream"])
async def test_an_html_page_is_a_contract_error(make_endpoint: MakeEndpoint, path: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="<html><title>Sign in</title></html>", content_type="text/html")

    async with AsyncClient(await make_endpoint(handler)) as c:
        with pytest.raises(ContractError, match=r"HTML page \(text/html\)") as info:
            if path == "stream":
                async with c.stream("hi") as stream:
                    async for _ in stream:
                        pass
            else:
                await c.generate("hi")
    assert "Sign in" in info.value.body_excerpt


# -- 9. a stream left early: async with, the pool timeout, the garbage-collection warning -------


async def endless(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Accept", "").startswith("text/event-stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        while True:
            await resp.write(sse_event("more"))
            await asyncio.sleep(0.01)  # pacing a never-ending stream
    return web.json_response({"prompt": "unary"})


async def test_async_with_releases_the_slot_on_exit(make_endpoint: MakeEndpoint) -> None:
    async with AsyncClient(await make_endpoint(endless), max_concurrency=2) as c:
        kept = []
        for _ in range(2):
            stream = c.stream("go")
            kept.append(stream)  # still referenced, as in the issue
            async with stream as pieces:
                async for _ in pieces:
                    break
        assert await asyncio.wait_for(c.generate("hi"), GUARD) == "unary"
        assert c.pool.slots_in_use == 0 and c.pool.max_concurrency == 2


async def test_waiting_for_a_slot_can_be_bounded(make_endpoint: MakeEndpoint) -> None:
    async with AsyncClient(await make_endpoint(endless), max_concurrency=1) as c:
        held = c.stream("go")
        assert await held.__anext__() == "more"
        with pytest.raises(PoolTimeoutError, match="all 1 concurrency slots") as info:
            await c.generate("hi", timeout=Timeout(pool=0.05))
        assert isinstance(info.value, TimeoutError) and info.value.slots == 1
        await held.aclose()
        # The default (pool=None) waits: more calls than slots just queue.
        texts = await asyncio.wait_for(c.generate_many(["a", "b", "c"]), GUARD)
        assert texts == ["unary"] * 3


async def test_a_stream_collected_while_open_warns_and_frees_its_slot(
    make_endpoint: MakeEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncClient(await make_endpoint(endless), max_concurrency=1) as c:
        stream = c.stream("go")
        async for _ in stream:
            break
        with pytest.warns(ResourceWarning, match="garbage-collected while still open"):
            del stream  # the last reference: collected at once
        assert "async with client.stream" in caplog.text
        assert await asyncio.wait_for(c.generate("hi"), GUARD) == "unary"


async def test_a_stream_read_to_its_end_does_not_warn(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await streamed(request, "text/event-stream", [sse_event("a"), b"data: [DONE]\n\n"])

    async with AsyncClient(await make_endpoint(handler)) as c:
        stream = c.stream("go")
        assert [p async for p in stream] == ["a"]
        del stream
        gc.collect()  # filterwarnings=error: a warning here fails the test


# -- 10. the last SSE event at EOF, when no terminator is required ------------------------------


async def test_final_sse_event_is_delivered_at_eof(make_endpoint: MakeEndpoint) -> None:
    body = [b'data: {"prompt": "Hello"}\n\n', b'data: {"prompt": " world"}\n']

    async def handler(request: web.Request) -> web.StreamResponse:
        return await streamed(request, "text/event-stream", body)

    url = await make_endpoint(handler)
    async with AsyncClient(url, stream_require_done=False) as c, c.stream("hi") as stream:
        assert [p async for p in stream] == ["Hello", " world"]


async def test_a_half_line_at_eof_is_still_an_interruption(make_endpoint: MakeEndpoint) -> None:
    body = [b'data: {"prompt": "Hello"}\n\n', b'data: {"prompt": " wor']

    async def handler(request: web.Request) -> web.StreamResponse:
        return await streamed(request, "text/event-stream", body)

    async with AsyncClient(await make_endpoint(handler), stream_require_done=False) as c:
        with pytest.raises(StreamInterruptedError, match="middle of a line") as info:
            async with c.stream("hi") as stream:
                async for _ in stream:
                    pass
    assert info.value.partial_text == "Hello"
