"""Under Python 3.12's eager task factory: a task runs its first step inside ``create_task``.

Code that counts on a new task (or an await of finished work) yielding to the loop first
breaks here: ``FaultProxy.stop`` once spun forever on 3.12 because a gather of finished
tasks completed without yielding. Every kind of call, a cancellation and the fault proxy
run with the factory on; the pool must come back idle.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import pytest

from modal_llm import AsyncClient
from modal_llm.server import ServerConfig, create_app, serve, toy_generate
from modal_llm.testing import FaultConfig, FaultProxy

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in Python 3.12"
)


@pytest.fixture
async def eager_tasks() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)
    yield
    loop.set_task_factory(None)


@pytest.mark.usefixtures("eager_tasks")
async def test_every_kind_of_call_and_a_cancellation() -> None:
    app = create_app(ServerConfig(pieces=5))
    async with serve(app) as url, AsyncClient(url, max_concurrency=4) as client:
        assert await client.generate("hi") == toy_generate("hi")
        pieces = [piece async for piece in client.stream("hello there")]
        assert "".join(pieces) == toy_generate("hello there")
        results = [r async for r in client.map([f"p{i}" for i in range(20)], ordered=True)]
        assert [r.text for r in results] == [toy_generate(f"p{i}") for i in range(20)]
        assert await client.generate_many(["a", "b"]) == [toy_generate(p) for p in "ab"]
        call = asyncio.ensure_future(client.generate("cancelled"))
        await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        pool = client.pool
        assert (pool.slots_in_use, pool.connections_in_use) == (0, 0), pool


@pytest.mark.usefixtures("eager_tasks")
async def test_the_fault_proxy_starts_serves_and_stops() -> None:
    async with serve(create_app(ServerConfig())) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        faults = FaultConfig(refuse=0.3, cut=0.3, seed=1)
        async with FaultProxy("127.0.0.1", port, faults) as proxy:
            async with AsyncClient(proxy.url, max_concurrency=4) as client:
                prompts = [f"q{i}" for i in range(30)]
                await client.generate_many(prompts, return_exceptions=True)
            await asyncio.wait_for(proxy.wait_idle(), 10)
        assert proxy.errors == []
        assert proxy.open_connections == 0
