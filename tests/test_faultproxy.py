"""Tests for the fault-injecting proxy, driven by a plain aiohttp client and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from modal_llm.testing import FAULT_KINDS, FaultConfig, FaultProxy
from modal_llm.testing._faultplan import Limiter, choose_fault, framing, request_complete

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    MakeProxy = Callable[[FaultConfig], Awaitable[FaultProxy]]

pytestmark = pytest.mark.timeout(30)

STREAM_LINES = [f"line {i:02d} of a streamed reply\n".encode() for i in range(20)]
STREAM_BODY = b"".join(STREAM_LINES)
BIG_BODY = bytes(range(256)) * 20
JSON_REPLY = {"prompt": "echo: hello"}
SHORT_TIMEOUT = aiohttp.ClientTimeout(sock_read=0.2)


@dataclass
class Upstream:
    port: int
    hits: int = 0


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream(port=0)

    async def complete(request: web.Request) -> web.Response:
        up.hits += 1
        body = await request.json()
        return web.json_response({"prompt": f"echo: {body['prompt']}"})

    async def stream(request: web.Request) -> web.StreamResponse:
        up.hits += 1
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        for line in STREAM_LINES:
            await response.write(line)
        await response.write_eof()
        return response

    async def big(request: web.Request) -> web.Response:
        up.hits += 1
        return web.Response(body=BIG_BODY, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_post("/complete", complete)
    app.router.add_post("/stream", stream)
    app.router.add_get("/big", big)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    up.port = server.port
    yield up
    await server.close()


@pytest.fixture
async def make_proxy(upstream: Upstream) -> AsyncIterator[MakeProxy]:
    proxies: list[FaultProxy] = []

    async def make(config: FaultConfig) -> FaultProxy:
        proxy = FaultProxy("127.0.0.1", upstream.port, config)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.stop()
        assert proxy.open_connections == 0
        assert proxy.errors == []


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post_json(
    session: aiohttp.ClientSession, proxy: FaultProxy, timeout: aiohttp.ClientTimeout | None = None
) -> object:
    async with session.post(
        proxy.url + "complete", json={"prompt": "hello"}, timeout=timeout
    ) as response:
        assert response.status == 200
        return await response.json()


async def post_stream(session: aiohttp.ClientSession, proxy: FaultProxy) -> bytes:
    async with session.post(proxy.url + "stream", json={"prompt": "hello"}) as response:
        assert response.status == 200
        return await response.read()


async def raw_request(proxy: FaultProxy, request: bytes) -> tuple[bytes, BaseException | None]:
    """Send ``request`` on a fresh socket; return what came back until EOF, and any error."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    received = b""
    error: BaseException | None = None
    try:
        if request:
            writer.write(request)
            await writer.drain()
        while chunk := await reader.read(65536):
            received += chunk
    except OSError as exc:
        error = exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return received, error


async def read_into(response: aiohttp.ClientResponse, received: bytearray) -> None:
    """Append the body to ``received`` as it arrives, so a failure keeps what came before it."""
    async for chunk in response.content.iter_any():
        received += chunk


GET_BIG = b"GET /big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


# -- pure pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"refuse": 1.5},
        {"cut": -0.1},
        {"delay": float("nan")},
        {"reset": 0.6, "cut": 0.6},
        {"delay_seconds": -1.0},
        {"cut_after": -1},
        {"schedule": ["none", "explode"]},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"FaultConfig|schedule"):
        FaultConfig(**kwargs)  # type: ignore[arg-type]


def test_choose_fault_uses_schedule_first_without_consuming_randomness() -> None:
    config = FaultConfig(cut=0.5, delay=0.5, schedule=["reset", "none"])
    rng = random.Random(3)
    chosen = [choose_fault(config, rng) for _ in range(12)]
    reference = random.Random(3)
    expected = ["cut" if reference.random() < 0.5 else "delay" for _ in range(10)]
    assert chosen == ["reset", "none", *expected]
    assert config.schedule == []


def test_choose_fault_covers_every_kind_in_order() -> None:
    config = FaultConfig(
        refuse=1 / 7, reset=1 / 7, stall_before=1 / 7, stall_mid=1 / 7, cut=1 / 7, delay=1 / 7
    )
    rng = random.Random(0)
    seen = {choose_fault(config, rng) for _ in range(500)}
    assert seen == set(FAULT_KINDS)


@pytest.mark.parametrize(
    ("buf", "complete"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab", False),
        (b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nabcd", True),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n", False),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n", True),
    ],
)
def testrequest_complete(buf: bytes, complete: bool) -> None:
    assert request_complete(buf) is complete


def testframing_reads_length_and_chunked() -> None:
    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 12") == (12, False)
    assert framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked") == (None, True)
    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: nope") == (None, False)


HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"


def test_limiter_stops_after_n_bytes_inside_the_body() -> None:
    limiter = Limiter(len(HEAD) + 3)
    assert limiter.feed(HEAD[:5]) == (b"", False)  # nothing leaves before the head is parsed
    assert limiter.feed(HEAD[5:] + b"0123456789") == (HEAD + b"012", True)
    assert limiter.rest() == b"3456789"


@pytest.mark.parametrize("after", [0, 10_000])
def test_limiter_is_clamped_between_head_and_last_byte(after: int) -> None:
    out, reached = Limiter(after).feed(HEAD + b"0123456789")
    assert reached
    assert out == (HEAD if after == 0 else HEAD + b"012345678")


def test_limiter_holds_back_the_chunked_terminator() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    limiter = Limiter(10_000)
    assert limiter.feed(head + b"3\r\nabc\r\n") == (head + b"3\r\nabc\r\n", False)
    assert limiter.feed(b"0\r\n\r\n") == (b"", True)
    assert limiter.rest() == b"0\r\n\r\n"


def test_limiter_finish_holds_back_the_last_byte_of_a_close_delimited_reply() -> None:
    limiter = Limiter(10_000)
    assert limiter.feed(b"HTTP/1.0 200 OK\r\n\r\nabc") == (b"HTTP/1.0 200 OK\r\n\r\nabc", False)
    assert limiter.finish() == (b"", True)
    assert Limiter(5).finish() == (b"", False)


# -- through the proxy ---------------------------------------------------------------------------


async def test_url_and_port(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(FaultConfig())
    assert proxy.port > 0
    assert proxy.url == f"http://127.0.0.1:{proxy.port}/"


async def test_none_passes_replies_through_unchanged(
    make_proxy: MakeProxy, session: aiohttp.ClientSession, upstream: Upstream
) -> None:
    proxy = await make_proxy(FaultConfig())
    assert await post_json(session, proxy) == JSON_REPLY
    assert await post_stream(session, proxy) == STREAM_BODY
    async with session.get(proxy.url + "big") as response:
        assert await response.read() == BIG_BODY
    assert proxy.counts == {"none": 3}
    assert proxy.connections == 1  # keep-alive: three requests, one connection
    assert upstream.hits == 3


async def test_refuse_closes_before_any_response(
    make_proxy: MakeProxy, session: aiohttp.ClientSession, upstream: Upstream
) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["refuse"]))
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_json(session, proxy)
    assert upstream.hits == 0
    assert await post_json(session, proxy) == JSON_REPLY  # schedule used up: rates (all 0) apply
    assert proxy.counts == {"refuse": 1, "none": 1}


async def test_refuse_sends_eof_without_reading(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["refuse"]))
    assert await raw_request(proxy, b"") == (b"", None)


async def test_reset_sends_rst_after_reading_the_request(
    make_proxy: MakeProxy, session: aiohttp.ClientSession, upstream: Upstream
) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["reset", "reset"]))
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_json(session, proxy)
    received, error = await raw_request(proxy, GET_BIG)
    assert received == b""
    assert isinstance(error, ConnectionResetError)
    assert upstream.hits == 0  # a reset never forwards the request
    assert proxy.counts == {"reset": 2}


async def test_stall_before_trips_the_read_timeout(
    make_proxy: MakeProxy, session: aiohttp.ClientSession, upstream: Upstream
) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["stall_before"]))
    with pytest.raises(asyncio.TimeoutError):
        await post_json(session, proxy, timeout=SHORT_TIMEOUT)
    assert upstream.hits == 1  # the request went through; only the reply was held
    await proxy.wait_idle()  # the client gave up and closed: the stall ends with it
    assert proxy.stalled == 0
    assert proxy.counts == {"stall_before": 1}


async def test_stall_before_completes_once_released(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["stall_before"]))
    request = asyncio.create_task(post_json(session, proxy))
    await proxy.wait_stalled()
    assert not request.done()
    proxy.release()
    assert await request == JSON_REPLY
    assert proxy.stalled == 0


async def test_stall_mid_sends_headers_and_part_of_the_body(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["stall_mid"], stall_after=300))
    received = bytearray()
    async with session.post(proxy.url + "stream", json={"prompt": "hello"}) as response:
        assert response.status == 200
        await proxy.wait_stalled()
        with pytest.raises(asyncio.TimeoutError):  # stands for the client's read timeout
            await asyncio.wait_for(read_into(response, received), 0.2)
    assert received
    assert STREAM_BODY.startswith(received)
    assert received != STREAM_BODY


async def test_stall_mid_completes_once_released(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["stall_mid", "stall_mid"]))
    request = asyncio.create_task(post_json(session, proxy))
    await proxy.wait_stalled()
    proxy.release()
    assert await request == JSON_REPLY
    request_stream = asyncio.create_task(post_stream(session, proxy))
    await proxy.wait_stalled()
    proxy.release()
    assert await request_stream == STREAM_BODY
    assert proxy.counts == {"stall_mid": 2}


async def test_cut_truncates_a_json_reply(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    # The reply is shorter than cut_after: the cut still lands before its last byte.
    proxy = await make_proxy(FaultConfig(schedule=["cut"], cut_after=10_000))
    async with session.post(proxy.url + "complete", json={"prompt": "hello"}) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert proxy.counts == {"cut": 1}


async def test_cut_truncates_a_stream(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["cut", "cut"], cut_after=300))
    received = bytearray()
    async with session.post(proxy.url + "stream", json={"prompt": "hello"}) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_into(response, received)
    assert received
    assert STREAM_BODY.startswith(received)
    assert received != STREAM_BODY
    proxy.config.cut_after = 10**6  # longer than the stream: only the terminator is withheld
    with pytest.raises(aiohttp.ClientPayloadError):
        await post_stream(session, proxy)


async def test_cut_forwards_exactly_cut_after_bytes(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["cut"], cut_after=300))
    received, error = await raw_request(proxy, GET_BIG)
    assert error is None
    assert len(received) == 300
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_delay_still_completes(make_proxy: MakeProxy, session: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(FaultConfig(delay=1.0, delay_seconds=0.001))
    assert await post_json(session, proxy) == JSON_REPLY
    assert await post_stream(session, proxy) == STREAM_BODY
    received, error = await raw_request(proxy, GET_BIG)
    assert error is None
    assert received.endswith(b"\r\n\r\n" + BIG_BODY)
    assert proxy.counts == {"delay": 3}


async def test_faults_are_chosen_per_request_on_a_kept_alive_connection(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["none", "delay", "cut", "none"]))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        assert await post_json(session, proxy) == JSON_REPLY
        assert await post_json(session, proxy) == JSON_REPLY
        with pytest.raises(aiohttp.ClientPayloadError):
            await post_json(session, proxy)
        assert await post_json(session, proxy) == JSON_REPLY
    assert proxy.history == ["none", "delay", "cut", "none"]
    assert proxy.connections == 2  # the cut closed the first connection


async def drive(proxy: FaultProxy, requests: int) -> list[bool]:
    """Send ``requests`` sequential requests; return which ones succeeded."""
    outcomes = []
    async with aiohttp.ClientSession() as session:
        for _ in range(requests):
            try:
                outcomes.append(await post_json(session, proxy) == JSON_REPLY)
            except aiohttp.ClientError:
                outcomes.append(False)
    return outcomes


async def test_rates_with_a_seed_give_a_reproducible_sequence(make_proxy: MakeProxy) -> None:
    def config(seed: int) -> FaultConfig:
        return FaultConfig(refuse=0.15, reset=0.15, cut=0.15, delay=0.15, seed=seed)

    first = await make_proxy(config(seed=11))
    second = await make_proxy(config(seed=11))
    other = await make_proxy(config(seed=12))
    outcomes = await drive(first, 40)
    assert await drive(second, 40) == outcomes
    await drive(other, 40)

    rng = random.Random(11)
    reference = config(seed=11)
    expected = [choose_fault(reference, rng) for _ in range(40)]
    assert first.history == second.history == expected
    assert other.history != expected
    assert set(expected) == {"refuse", "reset", "cut", "delay", "none"}
    assert outcomes == [kind in ("none", "delay") for kind in expected]
    assert first.counts == second.counts
    assert sum(first.counts.values()) == 40


async def test_rates_can_change_between_phases(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(FaultConfig(refuse=1.0))
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_json(session, proxy)
    proxy.config.refuse = 0.0
    assert await post_json(session, proxy) == JSON_REPLY
    assert proxy.history == ["refuse", "none"]


async def test_stop_closes_every_connection_and_leaves_no_task(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(FaultConfig(schedule=["none", "stall_before", "stall_mid"]))
    assert await post_json(session, proxy) == JSON_REPLY  # leaves an idle keep-alive connection
    async with aiohttp.ClientSession() as other:
        stalled = [asyncio.create_task(post_json(other, proxy)) for _ in range(2)]
        await proxy.wait_stalled(2)
        assert proxy.open_connections == 3
        await proxy.stop()
        assert proxy.open_connections == 0
        assert proxy.stalled == 0
        for task in stalled:
            with pytest.raises(aiohttp.ClientError):
                await task
    await proxy.wait_idle()
    await proxy.stop()  # idempotent
    left = [
        task
        for task in asyncio.all_tasks()
        if "FaultProxy" in getattr(task.get_coro(), "__qualname__", "")
    ]
    assert left == []
    with pytest.raises(RuntimeError):
        await proxy.start()


async def test_async_with_starts_and_stops(upstream: Upstream) -> None:
    async with FaultProxy("127.0.0.1", upstream.port) as proxy:
        async with aiohttp.ClientSession() as session:
            assert await post_json(session, proxy) == JSON_REPLY
        await proxy.wait_idle()
    assert proxy.open_connections == 0
    assert proxy.counts == {"none": 1}


def _outcome(task: asyncio.Future[Any]) -> Any:
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception() or task.result()


async def test_stop_right_after_the_last_connection_ended_returns(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stop()`` while a connection's task has finished but its done callback has not run.

    ``wait_idle()`` returns in that state. A gather of tasks that have all finished need not
    yield to the loop: Python 3.12 completes it at once. Here every Python does so; a stop()
    that waits for the done callbacks to empty its task set would spin forever.
    """
    real_gather = asyncio.gather
    spins = 0

    async def eager_gather(*aws: Any, return_exceptions: bool = False) -> list[Any]:
        nonlocal spins
        if aws and all(isinstance(aw, asyncio.Future) and aw.done() for aw in aws):
            spins += 1
            assert spins < 100, "stop() spun on tasks that had finished"
            return [_outcome(aw) for aw in aws]  # no yield to the loop
        return await real_gather(*aws, return_exceptions=return_exceptions)

    async with FaultProxy("127.0.0.1", upstream.port) as proxy:
        async with aiohttp.ClientSession() as session:
            assert await post_json(session, proxy) == JSON_REPLY
        await proxy.wait_idle()
        monkeypatch.setattr(asyncio, "gather", eager_gather)
    assert proxy.open_connections == 0
    assert proxy.errors == []
