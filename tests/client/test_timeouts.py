"""Timeouts end-to-end: first byte, read, deadline, per-call overrides."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    ConfigError,
    EndpointTimeoutError,
    ModalLLMError,
    RetryPolicy,
    ServerError,
    Timeout,
)

from ..conftest import NO_WAIT, MakeEndpoint
from .helpers import Recorder, reply


async def test_hang_longer_than_first_byte_timeout(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        await release.wait()
        return reply("too late")

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, timeout=Timeout(first_byte=0.2), max_retries=0) as c:
            with pytest.raises(EndpointTimeoutError) as info:
                await c.generate("hi")
    finally:
        release.set()
    assert info.value.phase == "first_byte"
    assert isinstance(info.value, TimeoutError)
    assert rec.posts == 1


async def test_first_byte_timeout_is_retried(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if rec.posts == 1:
            await release.wait()
        return reply("second try")

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, timeout=Timeout(first_byte=0.2), retry=NO_WAIT) as c:
            assert await c.generate("hi") == "second try"
    finally:
        release.set()
    assert rec.posts == 2


async def test_deadline_bounds_the_whole_call(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    # Every attempt fails fast with 503 and backoff is 0.2 s; the 0.3 s deadline stops it.
    policy = dataclasses.replace(NO_WAIT, wait_initial=0.2, wait_max=0.2, max_retries=50)
    url = await make_endpoint(handler)
    async with AsyncClient(url, retry=policy, timeout=Timeout(deadline=0.3)) as c:
        with pytest.raises(ModalLLMError) as info:
            await c.generate("hi")
    err = info.value
    assert isinstance(err, (ServerError, EndpointTimeoutError))
    assert err.attempts is None or err.attempts < 50


async def test_per_call_timeout_override(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return reply("late")

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, max_retries=0) as c:
            with pytest.raises(EndpointTimeoutError) as info:
                await c.generate("hi", timeout=0.2)
    finally:
        release.set()
    assert info.value.phase == "first_byte"


async def test_first_byte_watch_composes_with_outer_timeouts(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if (await request.json())["prompt"] == "slow":
            await release.wait()
        return reply("fast")

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, timeout=Timeout(first_byte=0.2), max_retries=0) as c:
            outer = getattr(asyncio, "timeout", None)  # Python 3.11+
            with pytest.raises(EndpointTimeoutError):
                if outer is None:
                    await c.generate("slow")
                else:
                    async with outer(5):
                        await c.generate("slow")
            task = asyncio.current_task()
            assert task is not None
            assert getattr(task, "cancelling", lambda: 0)() == 0  # our cancel was undone
            # The task is healthy: later awaits are not cancelled, and calls still work.
            await asyncio.sleep(0)
            assert await c.generate("quick") == "fast"
    finally:
        release.set()


async def test_stalled_error_body_keeps_its_status(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=503, headers={"Content-Type": "text/plain"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b"modal-http: serv")
        await release.wait()
        return resp

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, timeout=Timeout(read=0.2), max_retries=0) as c:
            with pytest.raises(ServerError) as info:
                await c.generate("hi")
    finally:
        release.set()
    # The read timeout ends the excerpt, not the outcome: the 503 the server sent stands.
    assert info.value.status_code == 503
    assert info.value.body_excerpt == "modal-http: serv"


@pytest.mark.parametrize("part", ["default", "connect", "first_byte", "read", "deadline", "pool"])
async def test_an_infinite_timeout_means_no_bound(part: str) -> None:
    # Review R4: inf was accepted, then every call raised a bare ValueError/OverflowError.
    from modal_llm.testing import local_endpoint

    timeout = Timeout(math.inf) if part == "default" else Timeout(**{part: math.inf})
    assert getattr(timeout, "connect" if part == "default" else part) is None
    async with local_endpoint() as endpoint:
        async with AsyncClient(endpoint.url, timeout=timeout) as c:
            assert await c.generate("hi")
            assert [piece async for piece in c.stream("hi")]
        async with AsyncClient(endpoint.url) as c:
            assert await c.generate("hi", timeout=timeout)
            assert await c.generate("hi", timeout=math.inf)


def test_timeout_inf_is_none_and_nan_is_refused() -> None:
    assert Timeout(math.inf) == Timeout(None)
    with pytest.raises(ConfigError):
        Timeout(read=math.nan)
    with pytest.raises(ConfigError):
        Timeout(connect=-math.inf)
    for name in ("wait_initial", "wait_max", "jitter", "max_retry_after"):
        with pytest.raises(ConfigError, match=name):
            RetryPolicy(**{name: math.nan})
