"""The concurrency cap, generate_many, and cancellation freeing slots and connections."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    PoolStats,
    StatusError,
)

from ..conftest import MakeEndpoint
from .helpers import Recorder, reply


async def test_concurrency_limit_is_never_exceeded(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()
    full = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        rec.in_flight += 1
        rec.max_in_flight = max(rec.max_in_flight, rec.in_flight)
        if rec.in_flight == 4:
            full.set()
        try:
            # Hold each request until the limit has been reached once, so overlap is real.
            await asyncio.wait_for(full.wait(), 2)
            await asyncio.sleep(0)
        finally:
            rec.in_flight -= 1
        return reply(request.path)

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_concurrency=4) as c:
        results = await c.generate_many([f"p{i}" for i in range(40)])
    assert len(results) == 40
    assert rec.max_in_flight == 4


async def test_generate_many_keeps_order_and_isolates_failures(
    make_endpoint: MakeEndpoint,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        if prompt == "bad":
            return web.Response(status=400, text="no")
        await asyncio.sleep(0.001 * (10 - int(prompt[1:])))  # finish out of order
        return reply(prompt.upper())

    prompts = ["p1", "p2", "bad", "p3", "p9"]
    async with AsyncClient(await make_endpoint(handler), max_concurrency=8) as c:
        results = await c.generate_many(prompts, return_exceptions=True)
        assert results[:2] == ["P1", "P2"]
        assert isinstance(results[2], StatusError)
        assert results[3:] == ["P3", "P9"]
        with pytest.raises(StatusError):
            await c.generate_many(prompts)


async def test_cancelling_an_in_flight_call_releases_the_connection(
    make_endpoint: MakeEndpoint,
) -> None:
    entered, gone = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if (await request.json())["prompt"] == "hang":
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                gone.set()  # aiohttp cancels the handler when the client disconnects
                raise
        return reply("next")

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_concurrency=1) as c:
        task = asyncio.ensure_future(c.generate("hang"))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(gone.wait(), 5)
        # The single slot and the pool are free again.
        assert await c.generate("after") == "next"


async def test_pool_shows_what_the_client_holds(make_endpoint: MakeEndpoint) -> None:
    arrived, gate = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        arrived.set()
        await gate.wait()
        return reply(request.path)

    url = await make_endpoint(handler)
    c = AsyncClient(url, max_concurrency=3)
    assert c.pool == PoolStats(3, 0, 0, 0)
    async with c:
        call = asyncio.create_task(c.generate("held"))
        await arrived.wait()
        assert c.pool == PoolStats(3, 1, 1, 0)
        gate.set()
        await call
        assert c.pool == PoolStats(3, 0, 0, 1)  # kept alive for the next call
    assert (c.pool.connections_in_use, c.pool.connections_idle) == (0, 0)
