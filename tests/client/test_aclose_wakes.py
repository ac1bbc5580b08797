"""``aclose()`` ends every call reading a reply body at once (review R24): aiohttp's close
dropped the body reader without waking it, so a unary call waited forever (its read timer
gone) and a stream until its read timeout. Read timeouts are off here: only aclose ends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from modal_llm import AsyncClient, ClientClosedError, StreamInterruptedError, Timeout

from ..conftest import MakeEndpoint

NO_READ_TIMEOUT = Timeout(None)  # no phase timer can end the call


@pytest.fixture
async def release() -> AsyncIterator[asyncio.Event]:
    event = asyncio.Event()
    yield event
    event.set()


async def test_aclose_ends_a_unary_call_reading_its_body(
    make_endpoint: MakeEndpoint, release: asyncio.Event
) -> None:
    started = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"prompt": "')
        started.set()
        await release.wait()
        return resp

    c = AsyncClient(await make_endpoint(handler), max_retries=0, timeout=NO_READ_TIMEOUT)
    call = asyncio.ensure_future(c.generate("hi"))
    await started.wait()
    await c.aclose()
    with pytest.raises(ClientClosedError):
        await asyncio.wait_for(call, 30)  # a bound on a hang, not a timing assert


async def test_aclose_ends_a_stream_waiting_for_its_next_chunk(
    make_endpoint: MakeEndpoint, release: asyncio.Event
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"prompt": "a"}\n\n')
        await release.wait()
        return resp

    c = AsyncClient(await make_endpoint(handler), max_retries=0, timeout=NO_READ_TIMEOUT)
    first = asyncio.Event()

    async def read() -> None:
        async with c.stream("hi") as stream:
            async for _ in stream:
                first.set()

    reader = asyncio.ensure_future(read())
    await first.wait()
    await c.aclose()
    with pytest.raises(StreamInterruptedError) as info:
        await asyncio.wait_for(reader, 30)
    assert info.value.ended_by == "client" and info.value.partial_text == "a"
