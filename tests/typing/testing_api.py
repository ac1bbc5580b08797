"""``modal_llm.testing`` usage that mypy --strict checks and nobody runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from typing_extensions import assert_type

from modal_llm.server import ServerStats
from modal_llm.testing import (
    AsyncLocalEndpoint,
    FaultConfig,
    FaultProxy,
    LocalEndpoint,
    RecordedRequest,
    ServerConfig,
    ServerThread,
    StreamReply,
    local_endpoint,
)


async def usage(modal_endpoint: LocalEndpoint, factory: Callable[..., LocalEndpoint]) -> None:
    async with local_endpoint(script=[429, "hi", StreamReply(["a"], end="drop")]) as endpoint:
        assert_type(endpoint, AsyncLocalEndpoint)
        assert_type(endpoint.url, str)
        assert_type(endpoint.port, int)
        assert_type(endpoint.requests, list[RecordedRequest])
        assert_type(endpoint.posts[0].status, int | None)
        assert_type(endpoint.posts[0].prompt, str | None)
        assert_type(endpoint.posts[0].time, float)
        assert_type(endpoint.stats, ServerStats)
        assert_type(endpoint.config, ServerConfig)
        endpoint.configure(latency=0.1, script=["again"])
        await endpoint.wait_for(lambda s: s.posts == 2)
        async with FaultProxy(endpoint.host, endpoint.port, FaultConfig(cut=0.1)) as proxy:
            assert_type(proxy.url, str)
    with LocalEndpoint(cold_start=1.0) as threaded:
        assert_type(threaded, LocalEndpoint)
        threaded.wait_for(lambda s: s.cold_starts == 1)
        await threaded.wait_for_async(lambda s: s.posts > 0, timeout=None)
    assert_type(factory(rate_limit_every=2).script_left, int)
    assert_type(modal_endpoint.bodies, list[Any])
    with ServerThread(web.Application()) as server:
        assert_type(server.call(lambda: 1), int)
