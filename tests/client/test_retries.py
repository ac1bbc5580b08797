"""Which failures are retried, how often, and how long the client waits (Retry-After)."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import time

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    AuthenticationError,
    ConnectError,
    RateLimitError,
    ServerError,
    StatusError,
)

from ..conftest import NO_WAIT, MakeEndpoint
from .helpers import KEY, SECRET, Recorder, reply


async def test_429_retry_after_seconds_is_honoured(
    make_endpoint: MakeEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if rec.posts == 1:
            return web.Response(status=429, text="slow down", headers={"Retry-After": "0.05"})
        return reply("done")

    caplog.set_level(logging.INFO, logger="modal_llm")
    url = await make_endpoint(handler)
    async with AsyncClient(url, retry=NO_WAIT, modal_key=KEY, modal_secret=SECRET) as c:
        assert await c.generate("hi") == "done"
    assert rec.posts == 2
    # The fallback backoff is 0 here, so a 0.05 s sleep can only come from Retry-After.
    assert any("sleeping 0.05s" in r.getMessage() for r in caplog.records)
    assert rec.headers[1]["X-Modal-LLM-Attempt"] == "2"
    assert rec.headers[0]["Idempotency-Key"] == rec.headers[1]["Idempotency-Key"]
    for record in caplog.records:
        assert KEY not in record.getMessage() and SECRET not in record.getMessage()


async def test_429_retry_after_http_date(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()
    past = email.utils.formatdate(time.time() - 5, usegmt=True)

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if rec.posts == 1:
            return web.Response(status=429, headers={"Retry-After": past})
        return reply("done")

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        assert await c.generate("hi") == "done"
    assert rec.posts == 2


async def test_retry_after_beyond_cap_raises_at_once(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        return web.Response(status=429, text='{"detail": "busy"}', headers={"Retry-After": "3600"})

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        with pytest.raises(RateLimitError) as info:
            await c.generate("hi")
    assert rec.posts == 1
    assert info.value.retry_after == 3600
    assert info.value.status_code == 429
    assert "retry after 3600s" in str(info.value)


async def test_5xx_then_success(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()
    statuses = [502, 503, 504]

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if statuses:
            return web.Response(status=statuses.pop(0), text="modal-http: upstream")
        return reply("finally")

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT, max_retries=3) as c:
        assert await c.generate("hi") == "finally"
    assert rec.posts == 4


async def test_persistent_5xx_reports_exact_attempts(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        return web.Response(status=500, text="modal-http: internal error: function execution")

    url = await make_endpoint(handler)
    async with AsyncClient(url, retry=dataclasses.replace(NO_WAIT, max_retries=2)) as c:
        with pytest.raises(ServerError) as info:
            await c.generate("hi")
    assert rec.posts == 3
    err = info.value
    assert err.attempts == 3
    assert err.status_code == 500
    assert str(err).startswith("500 Internal Server Error from http://127.0.0.1:")
    assert "after 3 attempts: modal-http: internal error" in str(err)
    assert [h["X-Modal-LLM-Attempt"] for h in rec.headers] == ["1", "2", "3"]


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, '{"detail": "bad request"}', StatusError),
        (401, "modal-http: missing credentials for proxy authorization", AuthenticationError),
        (403, "forbidden", AuthenticationError),
        (404, "modal-http: invalid function call", StatusError),
        (422, '{"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}', StatusError),
    ],
)
async def test_client_errors_are_not_retried(
    make_endpoint: MakeEndpoint, status: int, body: str, cls: type[StatusError]
) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        return web.Response(status=status, text=body)

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        with pytest.raises(cls) as info:
            await c.generate("hi")
    assert type(info.value) is cls
    assert rec.posts == 1
    assert info.value.status_code == status
    assert info.value.attempts == 1
    assert body[:50] in str(info.value)


async def test_connection_reset_before_response_is_retried(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if rec.posts == 1:
            assert request.transport is not None
            request.transport.close()  # drop the connection without answering
            raise web.HTTPInternalServerError()  # never sent: the socket is gone
        return reply("recovered")

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        assert await c.generate("hi") == "recovered"
    assert rec.posts == 2


async def test_unreachable_endpoint_is_a_connect_error() -> None:
    # Bind a port, then close it, so nothing listens there.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with AsyncClient(
        f"http://127.0.0.1:{port}/", retry=dataclasses.replace(NO_WAIT, max_retries=1)
    ) as c:
        with pytest.raises(ConnectError) as info:
            await c.generate("hi")
    assert info.value.attempts == 2
    assert "cannot connect" in str(info.value)
