"""AsyncClient.stream() end to end over loopback HTTP, one format at a time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    ConfigError,
    ContractError,
    EndpointTimeoutError,
    ReplyTooLargeError,
    ServerStreamError,
    StatusError,
    StreamInterruptedError,
    Timeout,
)

from ..conftest import NO_WAIT, MakeEndpoint

Writer = Callable[[web.StreamResponse], Awaitable[None]]


class Seen:
    """What the server observed: request bodies and headers, and client disconnects."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.gone = asyncio.Event()


def streaming(content_type: str, chunks: list[bytes], seen: Seen | None = None, **kw: Any) -> Any:
    """A handler that sends ``chunks`` one write at a time (each flushed at once)."""
    hold: asyncio.Event | None = kw.get("hold_after_first")
    hang = kw.get("hang_at_end", False)
    drop = kw.get("drop_at_end", False)

    async def handler(request: web.Request) -> web.StreamResponse:
        if seen is not None:
            seen.bodies.append(await request.json())
            seen.headers.append(dict(request.headers))
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        try:
            for i, chunk in enumerate(chunks):
                await resp.write(chunk)
                if i == 0 and hold is not None:
                    await hold.wait()
            if hang:
                await asyncio.Event().wait()
            if drop:
                assert request.transport is not None
                request.transport.close()
                return resp
        except (asyncio.CancelledError, ConnectionResetError):
            if seen is not None:
                seen.gone.set()
            raise
        await resp.write_eof()
        return resp

    return handler


def sse(*pieces: str, done: bool = True) -> list[bytes]:
    out = [f"data: {json.dumps({'prompt': p})}\n\n".encode() for p in pieces]
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


async def collect(client: AsyncClient, prompt: str = "hi", **kw: Any) -> list[str]:
    return [piece async for piece in client.stream(prompt, **kw)]


# -- formats --


async def test_sse_stream_and_request_shape(make_endpoint: MakeEndpoint) -> None:
    seen = Seen()
    url = await make_endpoint(streaming("text/event-stream", sse("Hel", "lo", " world"), seen))
    async with AsyncClient(url) as c:
        assert await collect(c, "hi", max_tokens=3) == ["Hel", "lo", " world"]
    assert seen.bodies == [{"prompt": "hi", "max_tokens": 3, "stream": True}]
    accept = seen.headers[0]["Accept"]
    for kind in ("text/event-stream", "application/x-ndjson", "text/plain", "application/json"):
        assert kind in accept


async def test_a_piece_larger_than_a_socket_read_arrives_whole(make_endpoint: MakeEndpoint) -> None:
    # A stream's socket is read SOCKET_READ_SIZE (64 KiB) at a time: one event of 300 KB,
    # written at once, takes several reads and still comes out as one piece.
    big = "".join(chr(0x41 + i % 26) for i in range(300_000)) + "\u00e9"
    url = await make_endpoint(streaming("text/event-stream", sse("a", big, "b")))
    async with AsyncClient(url) as c:
        assert await collect(c) == ["a", big, "b"]


async def test_stream_flag_is_configurable(make_endpoint: MakeEndpoint) -> None:
    seen = Seen()
    url = await make_endpoint(streaming("text/event-stream", sse("a"), seen))
    async with AsyncClient(url, stream_flag="sse") as c:
        assert await collect(c) == ["a"]
    async with AsyncClient(url, stream_flag=None) as c:
        assert await collect(c) == ["a"]
    assert seen.bodies == [{"prompt": "hi", "sse": True}, {"prompt": "hi"}]


async def test_ndjson_stream(make_endpoint: MakeEndpoint) -> None:
    lines = [b'{"prompt": "one "}\n', b'{"prompt": "two"}\n{"usage": 2}\n']
    url = await make_endpoint(streaming("application/x-ndjson", lines))
    async with AsyncClient(url) as c:
        assert "".join(await collect(c)) == "one two"


async def test_text_stream_with_split_multibyte_characters(make_endpoint: MakeEndpoint) -> None:
    data = "naïve café ☕ done".encode()
    cut = data.index("☕".encode()) + 1  # split inside the 3-byte character
    url = await make_endpoint(streaming("text/plain; charset=utf-8", [data[:cut], data[cut:]]))
    async with AsyncClient(url) as c:
        assert "".join(await collect(c)) == "naïve café ☕ done"


async def test_plain_json_endpoint_is_a_one_piece_stream(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"prompt": "whole answer", "usage": 1})

    async with AsyncClient(await make_endpoint(handler)) as c:
        assert await collect(c) == ["whole answer"]


async def test_plain_json_contract_break_is_typed(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"text": "wrong key"})

    async with AsyncClient(await make_endpoint(handler)) as c:
        with pytest.raises(ContractError):
            await collect(c)


# -- incremental delivery --


async def test_first_piece_arrives_while_server_is_paused(make_endpoint: MakeEndpoint) -> None:
    gate = asyncio.Event()
    url = await make_endpoint(
        streaming("text/event-stream", sse("first", "second"), hold_after_first=gate)
    )
    async with AsyncClient(url) as c:
        stream = c.stream("hi")
        assert await stream.__anext__() == "first"
        assert not gate.is_set()  # the server has not sent the rest yet
        gate.set()
        assert [p async for p in stream] == ["second"]


# -- failures --


async def test_mid_stream_drop_raises_with_partial_text(make_endpoint: MakeEndpoint) -> None:
    seen = Seen()
    url = await make_endpoint(
        streaming("text/event-stream", sse("par", "tial", done=False), seen, drop_at_end=True)
    )
    got: list[str] = []
    async with AsyncClient(url, retry=NO_WAIT) as c:
        with pytest.raises(StreamInterruptedError) as info:
            async for piece in c.stream("hi"):
                got.append(piece)
    assert got == ["par", "tial"]
    assert info.value.partial_text == "partial"
    assert len(seen.bodies) == 1  # never replayed after a piece reached the caller


async def test_partial_text_of_a_long_stream_is_every_piece_in_order(
    make_endpoint: MakeEndpoint,
) -> None:
    # The client keeps what it delivered compactly (joined every so many pieces): the
    # text carried by the error is still exactly the pieces, in order.
    words = [f"w{i} " for i in range(300)]
    url = await make_endpoint(
        streaming("text/event-stream", sse(*words, done=False), drop_at_end=True)
    )
    got: list[str] = []
    async with AsyncClient(url, retry=NO_WAIT) as c:
        with pytest.raises(StreamInterruptedError, match="after 300 pieces") as info:
            async for piece in c.stream("hi"):
                got.append(piece)
    assert got == words
    assert info.value.partial_text == "".join(words)


async def test_sse_without_done_is_not_complete(make_endpoint: MakeEndpoint) -> None:
    url = await make_endpoint(streaming("text/event-stream", sse("a", "b", done=False)))
    async with AsyncClient(url) as c:
        with pytest.raises(StreamInterruptedError, match=r"\[DONE\]") as info:
            await collect(c)
        assert info.value.partial_text == "ab"
    async with AsyncClient(url, stream_require_done=False) as c:
        assert await collect(c) == ["a", "b"]


async def test_error_event_raises_with_server_message(make_endpoint: MakeEndpoint) -> None:
    chunks = [*sse("ok ", done=False), b'event: error\ndata: {"error": "CUDA out of memory"}\n\n']
    url = await make_endpoint(streaming("text/event-stream", chunks))
    async with AsyncClient(url) as c:
        with pytest.raises(ServerStreamError) as info:
            await collect(c)
    assert "CUDA out of memory" in info.value.server_message
    assert info.value.partial_text == "ok "


async def test_ndjson_error_object_raises(make_endpoint: MakeEndpoint) -> None:
    lines = [b'{"prompt": "x"}\n', b'{"error": "model crashed"}\n']
    url = await make_endpoint(streaming("application/x-ndjson", lines))
    async with AsyncClient(url) as c:
        with pytest.raises(ServerStreamError, match="model crashed"):
            await collect(c)


async def test_retried_before_first_piece_only(make_endpoint: MakeEndpoint) -> None:
    seen = Seen()
    ok = streaming("text/event-stream", sse("fine"))

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.bodies.append(await request.json())
        if len(seen.bodies) == 1:
            return web.Response(status=503, text="cold start")
        if len(seen.bodies) == 2:
            # Headers sent, then the connection drops before any piece: still retried.
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b": keep-alive\n\n")
            assert request.transport is not None
            request.transport.close()
            return resp
        return await ok(request)  # type: ignore[no-any-return]

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        assert await collect(c) == ["fine"]
    assert len(seen.bodies) == 3


async def test_status_error_before_stream(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=422, text='{"detail": "prompt missing"}')

    async with AsyncClient(await make_endpoint(handler)) as c:
        with pytest.raises(StatusError, match="prompt missing"):
            await collect(c)


async def test_stream_size_cap(make_endpoint: MakeEndpoint) -> None:
    chunks = sse(*(["x" * 100] * 50))
    url = await make_endpoint(streaming("text/event-stream", chunks))
    async with AsyncClient(url, max_reply_bytes=1000) as c:
        with pytest.raises(ReplyTooLargeError):
            await collect(c)


# -- stop sequences and early exit --


async def test_stop_split_across_pieces_truncates_and_disconnects(
    make_endpoint: MakeEndpoint,
) -> None:
    seen = Seen()
    chunks = sse("Answer: 42\n", "\nQuestion: ", done=False)
    url = await make_endpoint(streaming("text/event-stream", chunks, seen, hang_at_end=True))
    async with AsyncClient(url) as c:
        assert "".join(await collect(c, stop=["\n\n"])) == "Answer: 42"
        # The client closed the connection at once, so the server stops generating.
        await asyncio.wait_for(seen.gone.wait(), 5)


async def test_breaking_out_releases_the_connection(make_endpoint: MakeEndpoint) -> None:
    url = await make_endpoint(streaming("text/event-stream", sse("a", "b"), hang_at_end=True))
    async with AsyncClient(url, max_concurrency=2) as c:
        for _ in range(30):
            stream = c.stream("hi")
            async for _piece in stream:
                break
            await stream.aclose()
        # A leaked slot or connection would block here with max_concurrency=2.
        pieces = await asyncio.wait_for(collect_first(c), 5)
        assert pieces == "a"


async def collect_first(client: AsyncClient) -> str:
    stream = client.stream("hi")
    try:
        return await stream.__anext__()
    finally:
        await stream.aclose()


async def test_cancelling_the_consumer_closes_the_response(make_endpoint: MakeEndpoint) -> None:
    seen = Seen()
    first = asyncio.Event()
    chunks = sse("a", done=False)
    url = await make_endpoint(streaming("text/event-stream", chunks, seen, hang_at_end=True))
    async with AsyncClient(url, max_concurrency=1) as c:

        async def consume() -> None:
            async for _ in c.stream("hi"):
                first.set()

        task = asyncio.ensure_future(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(seen.gone.wait(), 5)
        assert await asyncio.wait_for(collect_first(c), 5) == "a"


async def test_bad_stop_argument(make_endpoint: MakeEndpoint) -> None:
    url = await make_endpoint(streaming("text/event-stream", sse("a")))
    async with AsyncClient(url) as c:
        with pytest.raises(ConfigError):
            c.stream("hi", stop=[""])


async def test_deadline_bounds_a_running_stream(make_endpoint: MakeEndpoint) -> None:
    chunks = sse("a", "b", done=False)
    url = await make_endpoint(streaming("text/event-stream", chunks, hang_at_end=True))
    async with AsyncClient(url, timeout=Timeout(deadline=0.3)) as c:
        with pytest.raises(StreamInterruptedError, match="deadline") as info:
            await collect(c)
    assert info.value.partial_text == "ab"
    assert isinstance(info.value.__cause__, EndpointTimeoutError)
    assert info.value.__cause__.phase == "deadline"


async def test_read_timeout_counts_silence_while_the_caller_is_busy(
    make_endpoint: MakeEndpoint,
) -> None:
    # As with aiohttp's own timer: the server's silence counts from its last byte even
    # while a slow caller has a little unread data, so a stall is not hidden by the caller.
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in sse("a", "b", done=False):
            await resp.write(chunk)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # silent far longer than the read timeout
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    url = await make_endpoint(handler)
    async with AsyncClient(url, timeout=Timeout(read=0.2)) as c:
        pieces = c.stream("hi")
        with pytest.raises(StreamInterruptedError, match="reading") as info:
            async for piece in pieces:
                if piece == "a":
                    await asyncio.sleep(1.0)  # a busy caller; "b" waits unread meanwhile
    assert info.value.partial_text.startswith("a")


async def test_read_timeout_on_a_stalled_stream(make_endpoint: MakeEndpoint) -> None:
    chunks = sse("a", done=False)
    url = await make_endpoint(streaming("text/event-stream", chunks, hang_at_end=True))
    async with AsyncClient(url, timeout=Timeout(read=0.2)) as c:
        with pytest.raises(StreamInterruptedError, match="reading") as info:
            await collect(c)
    assert info.value.partial_text == "a"
