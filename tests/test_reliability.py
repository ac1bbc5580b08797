"""Reliability: a short soak under injected faults, cancellation storms, and the bounds.

The soak is ``benchmarks/soak.py`` at a few thousand requests (the script runs 50,000; its
figures are in docs/reliability.md). Cancellation storms cancel calls at random points of
their life and then check that every slot and connection came back, that the endpoint saw
the disconnects, and that the next call works. The bounds tests give the client endless,
stalled or trickling replies: each must end in a typed error, never a hang or a buffer that
grows without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from benchmarks.soak import SoakConfig, run_soak
from modal_llm import (
    AsyncClient,
    Client,
    EndpointTimeoutError,
    ModalLLMError,
    ReplyTooLargeError,
    ResultPendingError,
    RetryPolicy,
    ServerError,
    StreamError,
    StreamInterruptedError,
    Timeout,
)
from modal_llm._call import Reply
from modal_llm._models import parse_reply
from modal_llm._unary import text_of
from modal_llm.server import STATS, ServerConfig, create_app, serve, toy_generate
from modal_llm.testing import FaultConfig, FaultProxy

from .conftest import NO_WAIT, MakeEndpoint

pytestmark = pytest.mark.timeout(60)

HANG_GUARD = 10.0
"""An outer bound on calls that must end far sooner; reaching it means a hang."""


def assert_pool_idle(client: AsyncClient) -> None:
    """Every concurrency slot is free and no pooled connection is checked out."""
    pool = client.pool
    assert pool.max_concurrency == client.options.max_concurrency
    assert (pool.slots_in_use, pool.connections_in_use) == (0, 0), pool


async def collect(client: AsyncClient, prompt: str, **kwargs: Any) -> str:
    return "".join([piece async for piece in client.stream(prompt, **kwargs)])


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


# -- the short soak -------------------------------------------------------------------------------


async def test_short_soak_loses_nothing_and_leaks_nothing() -> None:
    lines: list[str] = []
    report = await run_soak(SoakConfig(requests=3_000, seed=11), lines.append)
    failures = "\n".join(f"{c.name}: {c.detail}" for c in report.failures())
    assert report.ok, f"{failures}\n" + "\n".join(lines)
    assert len(report.samples) == 10
    assert sum(report.requests_by_kind.values()) == 3_000
    assert report.outcomes["text"] + report.outcomes["typed error"] == 3_000
    assert report.recovered > 0 and report.exhausted > 0


# -- cancellation storms --------------------------------------------------------------------------

STORM_PROMPTS = [f"storm {i} words here" for i in range(400)]


async def _yield(times: int) -> None:
    """Let the loop run ``times`` rounds: cancellation lands at varied points, no clock."""
    for _ in range(times):
        await asyncio.sleep(0)


def _modal_llm_tasks() -> list[asyncio.Task[Any]]:
    """Pending tasks running client code (fan-out workers, ...), the endpoint excluded."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        filename = "" if code is None else code.co_filename
        if "modal_llm" in filename and "modal_llm/server" not in filename and not task.done():
            found.append(task)
    return found


@pytest.fixture
async def slow_endpoint() -> AsyncIterator[tuple[str, web.Application]]:
    """The reference endpoint, slow enough that calls are caught in flight."""
    app = create_app(ServerConfig(pieces=12, piece_delay=0.002, latency=0.002))
    async with serve(app) as url:
        yield url, app


async def test_cancellation_storm_leaves_the_client_healthy(
    slow_endpoint: tuple[str, web.Application],
) -> None:
    url, app = slow_endpoint
    stats = app[STATS]
    rng = random.Random(5)
    finished: list[tuple[str, str]] = []  # (prompt, text) of calls that ran to the end

    async def generate(client: AsyncClient, prompt: str) -> None:
        finished.append((prompt, await client.generate(prompt)))

    async def stream(client: AsyncClient, prompt: str) -> None:
        finished.append((prompt, await collect(client, prompt)))

    async def stream_left_early(client: AsyncClient, prompt: str) -> None:
        async with contextlib.aclosing(client.stream(prompt)) as pieces:
            async for _ in pieces:
                break

    async def map_consumer(client: AsyncClient, prompt: str) -> None:
        prompts = [f"{prompt} item{i}" for i in range(12)]
        async for result in client.map(prompts, concurrency=4):
            if result.text is not None:
                finished.append((result.prompt, result.text))

    async def map_left_early(client: AsyncClient, prompt: str) -> None:
        prompts = [f"{prompt} item{i}" for i in range(50)]
        async with contextlib.aclosing(client.map(prompts, concurrency=6)) as results:
            async for _ in results:
                break

    async def many(client: AsyncClient, prompt: str) -> None:
        prompts = [f"{prompt} many{i}" for i in range(8)]
        texts = await client.generate_many(prompts)
        finished.extend(zip(prompts, texts, strict=True))

    kinds: list[Callable[[AsyncClient, str], Awaitable[None]]] = [
        generate,
        stream,
        stream_left_early,
        map_consumer,
        map_left_early,
        many,
    ]
    cancelled = 0
    async with AsyncClient(url, max_concurrency=16, retry=NO_WAIT) as client:
        for wave in range(8):
            tasks = [
                asyncio.ensure_future(rng.choice(kinds)(client, prompt))
                for prompt in STORM_PROMPTS[wave * 50 : (wave + 1) * 50]
            ]
            await stats.wait_for(lambda s: s.in_flight >= 8)
            for task in rng.sample(tasks, k=30):
                await _yield(rng.randrange(40))
                cancelled += task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            for outcome in outcomes:
                assert outcome is None or isinstance(outcome, asyncio.CancelledError), outcome
        assert cancelled > 30, cancelled
        # The endpoint saw the clients leave, and nothing of it still runs for them.
        await stats.wait_for(lambda s: s.in_flight == 0)
        assert stats.disconnects > 0
        assert _modal_llm_tasks() == []
        assert_pool_idle(client)
        assert finished, "no call survived the storm"
        for prompt, text in finished:
            assert text == toy_generate(prompt)
        # The client is healthy: every kind of call still works.
        assert await client.generate("after the storm") == toy_generate("after the storm")
        assert await collect(client, "after the storm") == toy_generate("after the storm")
        results = [r async for r in client.map(["one more", "and another"], ordered=True)]
        assert [r.text for r in results] == [toy_generate("one more"), toy_generate("and another")]
        assert_pool_idle(client)


async def test_cancellation_storm_through_faults(
    slow_endpoint: tuple[str, web.Application],
) -> None:
    """Cancelling while a retry is pending or a reply is stalled releases everything too."""
    url, _ = slow_endpoint
    faults = FaultConfig(refuse=0.1, reset=0.1, stall_before=0.1, stall_mid=0.1, cut=0.1, seed=3)
    rng = random.Random(8)
    async with FaultProxy("127.0.0.1", port_of(url), faults) as proxy:
        timeout = Timeout(1.0)
        async with AsyncClient(proxy.url, max_concurrency=8, retry=NO_WAIT, timeout=timeout) as c:

            async def call(prompt: str) -> None:
                with contextlib.suppress(ModalLLMError):
                    if rng.random() < 0.5:
                        await c.generate(prompt)
                    else:
                        await collect(c, prompt)

            tasks = [asyncio.ensure_future(call(p)) for p in STORM_PROMPTS[:120]]
            await asyncio.wait_for(proxy.wait_stalled(1), HANG_GUARD)
            for task in tasks:
                await _yield(rng.randrange(10))
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert_pool_idle(c)
            proxy.config = FaultConfig()  # faults off: the next calls must just work
            proxy.release()
            assert await c.generate("healthy") == toy_generate("healthy")
            assert await collect(c, "healthy") == toy_generate("healthy")
            assert_pool_idle(c)
        await asyncio.wait_for(proxy.wait_idle(), HANG_GUARD)
    assert proxy.errors == []
    assert sum(proxy.counts.values()) > 0


async def test_blocking_clients_leaving_streams_early_from_threads(
    slow_endpoint: tuple[str, web.Application],
) -> None:
    url, app = slow_endpoint
    stats = app[STATS]

    def worker(client: Client, seed: int) -> list[str]:
        rng = random.Random(seed)
        texts = []
        for i in range(15):
            prompt = f"thread {seed} call {i}"
            if rng.random() < 0.5:
                with contextlib.closing(client.stream(prompt)) as pieces:
                    for n, _ in enumerate(pieces):
                        if n == rng.randrange(4):
                            break  # closing the generator must close the response
            else:
                texts.append(client.generate(prompt) == toy_generate(prompt))
        return ["ok" if t else "wrong" for t in texts]

    client = await asyncio.to_thread(Client, url, max_concurrency=4)
    try:
        results = await asyncio.gather(*(asyncio.to_thread(worker, client, s) for s in range(4)))
        assert all(r == "ok" for rs in results for r in rs)
        await stats.wait_for(lambda s: s.in_flight == 0)
        assert stats.disconnects > 0
        aclient = client._aclient

        async def check() -> str:
            assert_pool_idle(aclient)
            return await aclient.generate("still fine")

        assert await asyncio.to_thread(client._live_portal().call, check) == toy_generate(
            "still fine"
        )
    finally:
        await asyncio.to_thread(client.close)


# -- bounds: reply size ---------------------------------------------------------------------------

CAP = 256 * 1024


class Endless:
    """A handler that writes ``chunk`` forever; records bytes written and the disconnect."""

    def __init__(self, content_type: str, chunk: bytes, head: bytes = b"") -> None:
        self.content_type = content_type
        self.chunk = chunk
        self.head = head
        self.written = 0
        self.gone = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": self.content_type})
        await resp.prepare(request)
        try:
            await resp.write(self.head)
            while True:
                await resp.write(self.chunk)
                self.written += len(self.chunk)
        except (ConnectionError, asyncio.CancelledError):
            self.gone.set()
            raise


@pytest.mark.parametrize(
    ("op", "content_type", "chunk"),
    [
        ("generate", "application/json", b"x" * 65536),
        ("stream", "text/event-stream", b'data: {"prompt": "ab"}\n\n' * 2000),  # valid events
        ("stream", "text/event-stream", b"data: " + b"y" * 65536),  # one line, no end
        ("stream", "application/x-ndjson", b'{"prompt": "' + b"z" * 65536),
        ("stream", "text/plain", b"w" * 65536),
        ("stream", "application/json", b"v" * 65536),
    ],
)
async def test_an_endless_reply_stops_at_max_reply_bytes(
    make_endpoint: MakeEndpoint, op: str, content_type: str, chunk: bytes
) -> None:
    handler = Endless(content_type, chunk, head=b'{"prompt": "' if op == "generate" else b"")
    url = await make_endpoint(handler.handle)
    async with AsyncClient(url, max_reply_bytes=CAP, max_retries=0) as client:
        with pytest.raises((ReplyTooLargeError, StreamError)) as info:
            if op == "generate":
                await asyncio.wait_for(client.generate("flood"), HANG_GUARD)
            else:
                await asyncio.wait_for(collect(client, "flood"), HANG_GUARD)
        # Past the first piece the cap is a StreamError (with partial_text) caused by it.
        error = info.value
        delivered = isinstance(error, StreamError)
        assert isinstance(error.__cause__ if delivered else error, ReplyTooLargeError)
        assert delivered == (content_type == "text/plain" or chunk.startswith(b"data: {"))
        await asyncio.wait_for(handler.gone.wait(), HANG_GUARD)  # the connection was dropped
        assert_pool_idle(client)
    # Socket buffers hold a few MB at most; an unbounded reader would have taken it all.
    assert handler.written < CAP + 32 * 2**20


async def test_a_huge_content_length_is_refused_before_reading(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 10 * 2**30
        await resp.prepare(request)
        await resp.write(b'{"prompt": "')
        await asyncio.Event().wait()  # never sends the rest
        return resp

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_reply_bytes=CAP, max_retries=0) as client:
        with pytest.raises(ReplyTooLargeError, match="exceeds max_reply_bytes"):
            await asyncio.wait_for(client.generate("big"), HANG_GUARD)
        assert_pool_idle(client)


def test_reply_texts_are_not_kept_in_a_cache() -> None:
    """Found by the soak: pydantic-core caches every string up to 64 characters by default,
    so up to 16384 unique reply texts stayed in memory (RSS grew ~5 MB over 50,000 calls).
    Only JSON keys are cached now: two parses of one body give two distinct strings."""
    body = b'{"prompt": "a short generated text", "usage": {"n": 1}}'
    first, second = parse_reply(body), parse_reply(body)
    assert first.text == second.text
    assert first.text is not second.text
    reply = Reply(200, body, "http://127.0.0.1/", "application/json")
    assert text_of(reply) == first.text  # generate's text-only parse keeps no texts either
    assert text_of(reply) is not text_of(reply)


def test_generate_takes_its_text_without_loading_pydantic() -> None:
    """pydantic's ~7,000 objects would lengthen every full GC of a process that only calls
    ``generate``/``map``; only ``complete`` (a ``Completion``) or a bad reply loads it."""
    code = (
        "import sys\n"
        "from modal_llm._call import Reply\n"
        "from modal_llm._unary import text_of\n"
        'reply = Reply(200, b\'{"prompt": "hi", "n": 1}\', \'http://h/\', None)\n'
        "assert text_of(reply) == 'hi'\n"
        "assert 'pydantic' not in sys.modules, 'pydantic loaded'\n"
        "try:\n"
        "    text_of(Reply(200, b'[]', 'http://h/', None))\n"
        "except Exception as exc:\n"
        "    assert 'not a JSON object' in str(exc), exc\n"
        "assert 'pydantic' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- bounds: redirect hops ------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["generate", "stream"])
async def test_an_endless_303_chain_stops_at_the_hop_cap(
    make_endpoint: MakeEndpoint, op: str
) -> None:
    counts = {"POST": 0, "GET": 0}
    finish = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        counts[request.method] = counts.get(request.method, 0) + 1
        if finish.is_set() and request.method == "GET":
            return web.json_response({"prompt": "finally"})
        call = f"fc-{counts['GET']}"
        return web.Response(status=303, headers={"Location": f"/r?__modal_function_call_id={call}"})

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_redirects=5) as client:
        with pytest.raises(ResultPendingError) as info:
            if op == "generate":
                await asyncio.wait_for(client.generate("long"), HANG_GUARD)
            else:
                await asyncio.wait_for(collect(client, "long"), HANG_GUARD)
        error = info.value
        assert error.hops == 5
        assert "__modal_function_call_id=fc-5" in error.result_url
        assert counts == {"POST": 1, "GET": 5}  # the prompt went out once
        finish.set()
        completion = await asyncio.wait_for(client.resume(error.result_url), HANG_GUARD)
        assert completion.text == "finally"
        assert counts["POST"] == 1
        assert_pool_idle(client)


# -- bounds: the stream idle timeout ---------------------------------------------------------------


@pytest.mark.parametrize("stream_format", ["sse", "ndjson", "text"])
async def test_a_stream_that_stalls_midway_times_out_with_its_partial_text(
    stream_format: str,
) -> None:
    app = create_app(ServerConfig(pieces=20, stream_format=stream_format))
    prompt = "a fairly long prompt so that the streamed answer has many pieces to send"
    expected = toy_generate(prompt)
    async with serve(app) as url:
        config = FaultConfig(schedule=["stall_mid"], stall_after=300)
        async with FaultProxy("127.0.0.1", port_of(url), config) as proxy:
            timeout = Timeout(connect=5, first_byte=5, read=0.3)
            async with AsyncClient(proxy.url, timeout=timeout, max_retries=0) as client:
                with pytest.raises(StreamInterruptedError) as info:
                    await asyncio.wait_for(collect(client, prompt), HANG_GUARD)
                partial = info.value.partial_text
                assert partial and expected.startswith(partial) and partial != expected
                cause = info.value.__cause__
                assert isinstance(cause, EndpointTimeoutError) and cause.phase == "read"
                assert proxy.stalled == 1
                proxy.release()
                assert_pool_idle(client)
                assert await collect(client, prompt) == expected  # next call: no fault
            await asyncio.wait_for(proxy.wait_idle(), HANG_GUARD)


async def test_a_unary_reply_that_stalls_midway_times_out(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 40
        await resp.prepare(request)
        await resp.write(b'{"prompt": "half')
        await release.wait()
        return resp

    url = await make_endpoint(handler)
    timeout = Timeout(connect=5, first_byte=5, read=0.3)
    async with AsyncClient(url, timeout=timeout) as client:
        with pytest.raises(EndpointTimeoutError) as info:
            await asyncio.wait_for(client.generate("x"), HANG_GUARD)
        assert info.value.phase == "read"
        assert info.value.attempts == 1  # the reply had started: not retried
        release.set()
        assert_pool_idle(client)


# -- bounds: the deadline -------------------------------------------------------------------------


async def hang_before_headers(request: web.Request) -> web.StreamResponse:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def trickle_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    while True:  # never ends, never goes quiet long enough for a read timeout
        await resp.write(b'data: {"prompt": "drip "}\n\n')
        await asyncio.sleep(0.02)


async def trickle_body(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b'{"prompt": "')
    while True:
        await resp.write(b"drip ")
        await asyncio.sleep(0.02)


async def endless_chain(request: web.Request) -> web.Response:
    if request.method == "GET":
        await asyncio.sleep(0.02)
    return web.Response(status=303, headers={"Location": "/r?__modal_function_call_id=fc-7"})


async def always_503(request: web.Request) -> web.Response:
    return web.Response(status=503, text="busy")


@pytest.mark.parametrize(
    ("handler", "op", "expected"),
    [
        (hang_before_headers, "generate", EndpointTimeoutError),
        (hang_before_headers, "stream", EndpointTimeoutError),
        (trickle_stream, "stream", StreamInterruptedError),
        (trickle_body, "generate", EndpointTimeoutError),
        (endless_chain, "generate", ResultPendingError),
        (endless_chain, "stream", ResultPendingError),
        (always_503, "generate", (ServerError, EndpointTimeoutError)),
    ],
)
async def test_the_deadline_bounds_every_kind_of_slowness(
    make_endpoint: MakeEndpoint,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    op: str,
    expected: type[ModalLLMError] | tuple[type[ModalLLMError], ...],
) -> None:
    """Per-phase timeouts are left at their (long) defaults: only the deadline can end these."""
    url = await make_endpoint(handler)
    retry = RetryPolicy(max_retries=10_000, wait_initial=0.01, wait_max=0.01, jitter=0)
    async with AsyncClient(
        url, timeout=Timeout(deadline=0.5), retry=retry, max_redirects=10**6
    ) as client:
        with pytest.raises(expected) as info:
            if op == "generate":
                await asyncio.wait_for(client.generate("slow"), HANG_GUARD)
            else:
                await asyncio.wait_for(collect(client, "slow"), HANG_GUARD)
        error = info.value
        if isinstance(error, EndpointTimeoutError):
            assert error.phase == "deadline"
        if isinstance(error, StreamInterruptedError):
            assert error.partial_text.startswith("drip drip")
            cause = error.__cause__
            assert isinstance(cause, EndpointTimeoutError) and cause.phase == "deadline"
        if isinstance(error, ResultPendingError):
            assert "fc-7" in error.result_url
        assert_pool_idle(client)
