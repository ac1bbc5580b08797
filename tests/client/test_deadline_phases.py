"""With ``Timeout.deadline`` set, a phase timeout or a pool timeout is still itself.

Our ``EndpointTimeoutError``/``PoolTimeoutError`` (and aiohttp's read timeout) subclass the
builtin ``TimeoutError``, which is ``asyncio.TimeoutError`` on Python >= 3.11: the deadline's
``wait_for`` must not mistake them for its own expiry (review R6). Every deadline here is
far away, so any "deadline" in an error is the bug.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    EndpointTimeoutError,
    PoolTimeoutError,
    ResultPendingError,
    StreamInterruptedError,
    Timeout,
)

from ..conftest import NO_WAIT, MakeEndpoint
from .helpers import reply

FAR = 600.0  # the deadline: never reached by these tests


@pytest.fixture
async def release() -> AsyncIterator[asyncio.Event]:
    """Set at teardown so every handler left waiting returns and the server closes."""
    event = asyncio.Event()
    yield event
    event.set()


async def test_first_byte_timeouts_keep_their_phase_and_attempts(
    make_endpoint: MakeEndpoint, release: asyncio.Event
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return reply("late")

    url = await make_endpoint(handler)
    policy = dataclasses.replace(NO_WAIT, max_retries=1)
    timeout = Timeout(first_byte=0.1, deadline=FAR)
    async with AsyncClient(url, retry=policy, timeout=timeout) as c:
        with pytest.raises(EndpointTimeoutError) as unary:
            await c.generate("hi")
        with pytest.raises(EndpointTimeoutError) as streamed:
            async with c.stream("hi") as stream:
                async for _ in stream:
                    pass
    for error in (unary.value, streamed.value):
        assert error.phase == "first_byte", error
        assert error.attempts == policy.max_retries + 1
        assert "deadline" not in str(error)


async def test_a_stalled_body_is_a_read_timeout(
    make_endpoint: MakeEndpoint, release: asyncio.Event
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 20
        await resp.prepare(request)
        await resp.write(b'{"prompt"')
        await release.wait()
        return resp

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_retries=0, timeout=Timeout(read=0.1, deadline=FAR)) as c:
        with pytest.raises(EndpointTimeoutError) as info:
            await c.generate("hi")
    assert info.value.phase == "read"


async def test_a_stream_stalled_after_a_piece_ends_on_its_read_timeout(
    make_endpoint: MakeEndpoint, release: asyncio.Event
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"prompt": "a"}\n\n')
        await release.wait()
        return resp

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_retries=0, timeout=Timeout(read=0.1, deadline=FAR)) as c:
        with pytest.raises(StreamInterruptedError) as info:
            async with c.stream("hi") as stream:
                async for _ in stream:
                    pass
    assert info.value.partial_text == "a"
    assert info.value.ended_by == "timeout"
    cause = info.value.__cause__
    assert isinstance(cause, EndpointTimeoutError) and cause.phase == "read"
    assert "deadline" not in str(info.value)


async def test_a_pool_timeout_stays_a_pool_timeout(
    make_endpoint: MakeEndpoint, release: asyncio.Event
) -> None:
    arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return reply("late")

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_retries=0, max_concurrency=1) as c:
        holder = asyncio.ensure_future(c.generate("hold the slot"))
        await arrived.wait()
        try:
            with pytest.raises(PoolTimeoutError):
                await c.generate("hi", timeout=Timeout(pool=0.1, deadline=FAR))
            with pytest.raises(PoolTimeoutError):
                async with c.stream("hi", timeout=Timeout(pool=0.1, deadline=FAR)) as stream:
                    async for _ in stream:
                        pass
        finally:
            holder.cancel()
            with pytest.raises(asyncio.CancelledError):
                await holder


async def test_a_result_poll_timeout_is_not_a_pending_result(
    make_endpoint: MakeEndpoint, release: asyncio.Event
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            raise web.HTTPSeeOther(location="/?__modal_function_call_id=fc-1")
        await release.wait()
        return reply("late")

    url = await make_endpoint(handler)
    timeout = Timeout(first_byte=0.1, deadline=FAR)
    async with AsyncClient(url, max_retries=0, timeout=timeout) as c:
        with pytest.raises(ResultPendingError) as info:
            await c.generate("hi")
    # Not the deadline (R6): the poll's own first-byte timeout, kept as the cause of the
    # resumable error a failed poll ends the call with (R13).
    assert "deadline" not in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, EndpointTimeoutError) and cause.phase == "first_byte"
