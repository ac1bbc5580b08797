"""Fan-out (``modal_llm._fanout``, ``_pacing``) against real HTTP on 127.0.0.1.

The reference endpoint covers the healthy and the 429 cases; small inline aiohttp apps
cover requests that block until the test releases them, so that ordering, windows and
cancellation are shown by events, never by timing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from modal_llm import (
    AdaptiveConcurrency,
    AsyncClient,
    BatchItem,
    BatchResult,
    ConfigError,
    RateLimiter,
    RetryPolicy,
    StatusError,
)
from modal_llm.server import STATS, ServerConfig, create_app, serve, toy_generate

from .conftest import NO_WAIT, MakeEndpoint

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Recorder:
    """An inline endpoint: answers ``{"prompt": upper(prompt)}``; prompts starting with
    "block" wait for ``release``, "bad" get 400, "busy" 429. Records bodies and disconnects."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.bodies: list[dict[str, Any]] = []
        self.blocked = 0
        self.disconnects = 0
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt: str = body["prompt"]
        if prompt.startswith("bad"):
            return web.Response(status=400, text="bad prompt")
        if prompt.startswith("busy"):
            return web.Response(status=429, text="busy", headers={"Retry-After": "0"})
        if prompt.startswith("block"):
            self.blocked += 1
            self.changed.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.disconnects += 1
                self.changed.set()
                raise
        return web.json_response({"prompt": prompt.upper()})

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)


@asynccontextmanager
async def recorder_endpoint() -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    app = web.Application()
    app.router.add_post("/", recorder.handle)
    async with serve(app) as url:
        yield url, recorder


def counting(n: int | None, pulled: list[int], prefix: str = "p") -> Iterator[str]:
    """Prompts ``prefix0, prefix1, ...``; ``pulled[0]`` counts how many were taken."""
    i = 0
    while n is None or i < n:
        pulled[0] += 1
        yield f"{prefix}{i}"
        i += 1


def worker_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if "_run.<locals>.worker" in repr(t.get_coro())]


async def test_lazy_input_stays_within_the_window() -> None:
    async with serve(ServerConfig()) as url, AsyncClient(url, max_concurrency=4) as client:
        pulled = [0]
        seen = 0
        most_tasks = 0
        baseline = len(asyncio.all_tasks())
        async for result in client.map(counting(2000, pulled), window=10):
            seen += 1
            assert result.ok
            assert pulled[0] <= seen + 10  # never more than `window` ahead of the consumer
            most_tasks = max(most_tasks, len(asyncio.all_tasks()))
        assert seen == 2000
        # 4 workers plus the server's per-connection tasks: nothing per item.
        assert most_tasks - baseline <= 4 * 4


async def test_break_on_a_million_prompts_pulls_only_the_window() -> None:
    async with serve(ServerConfig()) as url, AsyncClient(url, max_concurrency=8) as client:
        pulled = [0]
        results = client.map(counting(1_000_000, pulled), window=16)
        taken = 0
        async for _ in results:
            taken += 1
            if taken == 5:
                break
        await results.aclose()
        assert pulled[0] <= 5 + 16
        assert worker_tasks() == []


async def test_unordered_yields_as_completed() -> None:
    async with recorder_endpoint() as (url, rec), AsyncClient(url) as client:
        prompts = ["block-head", "a", "b", "c", "d"]
        indices = []
        async for result in client.map(prompts, concurrency=5):
            indices.append(result.index)
            if len(indices) == 4:
                rec.release.set()  # only now may the head finish
        assert indices[-1] == 0
        assert sorted(indices) == [0, 1, 2, 3, 4]


async def test_ordered_holds_results_behind_a_slow_head_within_the_window() -> None:
    async with recorder_endpoint() as (url, rec), AsyncClient(url) as client:
        pulled = [0]

        def prompts() -> Iterator[str]:
            pulled[0] += 1
            yield "block-head"
            yield from counting(19, pulled, prefix="x")

        def on_progress(done: int, total: int | None, failed: int) -> None:
            if done == 3:
                # Three results wait in the reorder buffer, the head is in flight: the
                # window (4) is full, so nothing more can have been pulled.
                assert pulled[0] == 4
                assert len(rec.bodies) == 4
                rec.release.set()

        results = [
            r async for r in client.map(prompts(), ordered=True, window=4, on_progress=on_progress)
        ]
        assert [r.index for r in results] == list(range(20))
        assert [r.prompt for r in results[:3]] == ["block-head", "x0", "x1"]
        assert results[1].text == "X0"


async def test_async_iterable_input_in_order() -> None:
    async def prompts() -> AsyncIterator[str]:
        for i in range(50):
            yield f"word{i} tail"

    async with serve(ServerConfig()) as url, AsyncClient(url, max_concurrency=8) as client:
        results = [r async for r in client.map(prompts(), ordered=True)]
    assert [r.index for r in results] == list(range(50))
    assert results[7].text == toy_generate("word7 tail")
    assert all(r.attempts == 1 and r.latency >= 0 for r in results)


async def test_per_item_results_ids_extras_and_errors() -> None:
    async with recorder_endpoint() as (url, rec), AsyncClient(url) as client:
        items: list[Any] = [
            "plain",
            BatchItem("bad one", id="b1", extra={"temperature": 0.5}),
            {"prompt": "mapped", "id": 42, "max_tokens": 7},
            BatchItem("item", extra={"max_tokens": 9}),
        ]
        results = {r.index: r async for r in client.map(items, max_tokens=3, top_k=1)}
    assert [results[i].id for i in range(4)] == [0, "b1", 42, 3]
    assert results[0].ok and results[0].text == "PLAIN" and results[0].error is None
    bad = results[1]
    assert not bad.ok and bad.text is None
    assert isinstance(bad.error, StatusError) and bad.error.status_code == 400
    assert bad.attempts == 1
    by_prompt = {b["prompt"]: b for b in rec.bodies}
    assert by_prompt["plain"] == {"prompt": "plain", "max_tokens": 3, "top_k": 1}
    assert by_prompt["bad one"] == {
        "prompt": "bad one",
        "max_tokens": 3,
        "top_k": 1,
        "temperature": 0.5,
    }
    assert by_prompt["mapped"]["max_tokens"] == 7
    assert by_prompt["item"]["max_tokens"] == 9


async def test_stop_sequences_and_str_subclasses_per_item() -> None:
    """``stop`` cuts every item's text; a ``str`` subclass is a prompt like any other."""

    class Prompt(str):
        pass

    async with recorder_endpoint() as (url, rec), AsyncClient(url) as client:
        items: list[Any] = ["one. two", Prompt("three. four"), {"prompt": "five. six", "id": "x"}]
        results = [r async for r in client.map(items, ordered=True, stop=["."])]
    assert [(r.id, r.prompt, r.text) for r in results] == [
        (0, "one. two", "ONE"),
        (1, "three. four", "THREE"),
        ("x", "five. six", "FIVE"),
    ]
    assert sorted(b["prompt"] for b in rec.bodies) == ["five. six", "one. two", "three. four"]


async def test_retried_item_reports_its_attempts() -> None:
    config = ServerConfig(error_burst=2, error_status=503)
    async with serve(config) as url, AsyncClient(url, retry=NO_WAIT) as client:
        [result] = [r async for r in client.map(["once"])]
    assert result.ok and result.attempts == 3


async def test_a_bug_in_the_input_propagates_and_stops_the_workers() -> None:
    def prompts() -> Iterator[str]:
        yield "a"
        yield "b"
        raise RuntimeError("input broke")

    async with serve(ServerConfig()) as url, AsyncClient(url) as client:
        with pytest.raises(RuntimeError, match="input broke"):
            async for _ in client.map(prompts(), concurrency=2):
                pass
        assert worker_tasks() == []
        with pytest.raises(ConfigError, match="item 1 must be a str"):
            async for _ in client.map(["ok", 3]):  # type: ignore[list-item]
                pass
        with pytest.raises(ConfigError, match="prompt must be a str"):
            async for _ in client.map([{"prompt": None}]):
                pass


async def test_invalid_arguments_raise_config_error_at_once() -> None:
    async with AsyncClient("http://127.0.0.1:9/") as client:
        with pytest.raises(ConfigError, match="single str"):
            client.map("not a list")
        with pytest.raises(ConfigError, match="concurrency"):
            client.map(["a"], concurrency=0)
        with pytest.raises(ConfigError, match="window"):
            client.map(["a"], window=0)
        with pytest.raises(ConfigError, match="'prompt'"):
            client.map(["a"], prompt="x")
        with pytest.raises(ConfigError, match="rate"):
            client.map(["a"], rate_limit=0)


async def test_breaking_out_cancels_requests_in_flight() -> None:
    async with recorder_endpoint() as (url, rec), AsyncClient(url) as client:
        pulled = [0]

        def prompts() -> Iterator[str]:
            pulled[0] += 1
            yield "fast"
            yield from counting(None, pulled, prefix="block")

        async for result in client.map(prompts(), concurrency=4, window=4):
            # Handing "fast" over freed its window slot: one more item went out.
            await rec.until(lambda: rec.blocked == 4)
            assert result.prompt == "fast"
            assert pulled[0] == 1 + 4
            break
        # The dropped generator is closed by the loop's async-generator finalizer.
        await rec.until(lambda: rec.disconnects == 4)
        assert pulled[0] == 1 + 4
        assert rec.blocked == 4
        for _ in range(3):
            await asyncio.sleep(0)
        assert worker_tasks() == []


async def test_cancelling_the_consumer_cancels_requests_in_flight() -> None:
    async with recorder_endpoint() as (url, rec), AsyncClient(url) as client:
        pulled = [0]
        got: list[BatchResult] = []

        async def consume() -> None:
            async for result in client.map(counting(None, pulled, "block"), concurrency=3):
                got.append(result)

        task = asyncio.create_task(consume())
        await rec.until(lambda: rec.blocked == 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert worker_tasks() == []
        await rec.until(lambda: rec.disconnects == 3)
        assert pulled[0] == 3 and got == []


async def test_aclose_cancels_requests_in_flight() -> None:
    async with recorder_endpoint() as (url, rec), AsyncClient(url) as client:
        results = client.map(["fast", "block1", "block2"], concurrency=3)
        first = await anext(results)
        assert first.text == "FAST"
        await rec.until(lambda: rec.blocked == 2)
        await results.aclose()
        assert worker_tasks() == []
        await rec.until(lambda: rec.disconnects == 2)


async def test_adaptive_concurrency_backs_off_on_429_then_recovers() -> None:
    # The first 24 POSTs get 429: the first window's 8 requests, retried twice each.
    config = ServerConfig(error_burst=24, error_status=429)
    app = create_app(config)
    retry = RetryPolicy(max_retries=10, wait_initial=0, wait_max=0, jitter=0)
    async with serve(app) as url, AsyncClient(url, max_concurrency=8, retry=retry) as client:
        limiter = AdaptiveConcurrency(8)
        limits: list[int] = []

        def on_progress(done: int, total: int | None, failed: int) -> None:
            limits.append(limiter.limit)

        results = [
            r
            async for r in client.map(
                [f"p{i}" for i in range(120)], adaptive=limiter, on_progress=on_progress
            )
        ]
        stats = app[STATS]
    assert all(r.ok for r in results)
    assert stats.statuses[429] == 24
    # One cut for the whole first window (8 * 0.7 -> 5), not one per 429.
    assert limiter.decreases == 1 and limiter.lowest == 5
    assert limits[0] < 8  # the consumer saw the lowered limit ...
    assert limits[-1] == 8 and limiter.increases == 3  # ... and its recovery: 5 -> 6 -> 7 -> 8


async def test_adaptive_limit_bounds_requests_in_flight() -> None:
    async with recorder_endpoint() as (url, rec), AsyncClient(url, max_concurrency=8) as client:
        limiter = AdaptiveConcurrency(8, initial=2)
        results = client.map(counting(None, [0], "block"), adaptive=limiter)
        consumer = asyncio.create_task(anext(results))
        await rec.until(lambda: rec.blocked == 2)
        assert limiter.in_flight == 2 and len(worker_tasks()) == 8
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await results.aclose()
        assert limiter.in_flight == 0


async def test_aimd_rules() -> None:
    limiter = AdaptiveConcurrency(4)
    tickets = [await limiter.acquire() for _ in range(4)]
    blocked = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    assert not blocked.done()

    assert limiter.on_congestion(tickets[0]) is True  # 4 * 0.7 -> 2
    assert limiter.limit == 2
    assert limiter.on_congestion(tickets[1]) is False  # same window: already in flight
    for _ in range(3):
        limiter.release(success=False)
    assert limiter.in_flight == 1
    fifth = await blocked  # one slot free under the limit of 2
    assert limiter.on_congestion(fifth) is True  # a new window: 2 -> 1
    assert limiter.limit == 1 == limiter.lowest
    limiter.release(success=True)  # one clean completion at limit 1: grow to 2
    assert limiter.limit == 2
    limiter.release(success=False)
    assert limiter.in_flight == 0 and limiter.increases == 1 and limiter.decreases == 2
    assert limiter.is_congestion(StatusError(status_code=503))
    assert not limiter.is_congestion(StatusError(status_code=500))
    with pytest.raises(ConfigError):
        AdaptiveConcurrency(4, minimum=5)
    with pytest.raises(ConfigError):
        AdaptiveConcurrency(4, decrease=1.0)


async def test_aimd_cancelled_waiter_passes_its_turn_on() -> None:
    limiter = AdaptiveConcurrency(1)
    await limiter.acquire()
    first = asyncio.ensure_future(limiter.acquire())
    second = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    limiter.release(success=False)  # wakes `first` ...
    first.cancel()  # ... which leaves before running
    assert await second == 1
    assert limiter.in_flight == 1


def test_rate_limiter_books_slots_without_polling() -> None:
    now = [0.0]
    limiter = RateLimiter(10, clock=lambda: now[0])
    assert [round(limiter.reserve(), 6) for _ in range(4)] == [0.0, 0.1, 0.2, 0.3]
    now[0] = 5.0  # long idle: credit does not pile up beyond one burst
    assert [round(limiter.reserve(), 6) for _ in range(2)] == [0.0, 0.1]

    bursty = RateLimiter(10, burst=3, clock=lambda: now[0])
    assert [round(bursty.reserve(), 6) for _ in range(5)] == [0.0, 0.0, 0.0, 0.1, 0.2]
    with pytest.raises(ConfigError):
        RateLimiter(float("inf"))
    with pytest.raises(ConfigError):
        RateLimiter(5, burst=0)


class CountingLimiter(RateLimiter):
    """A ``RateLimiter`` that records every booking's wait."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delays: list[float] = []

    def reserve(self) -> float:
        delay = super().reserve()
        self.delays.append(delay)
        return delay


async def test_rate_limit_is_shared_by_all_workers() -> None:
    frozen = 0.0
    limiter = CountingLimiter(5000, clock=lambda: frozen)  # time stands still: each waits longer
    app = create_app(ServerConfig())
    async with serve(app) as url, AsyncClient(url, max_concurrency=8) as client:
        results = [r async for r in client.map([f"p{i}" for i in range(20)], rate_limit=limiter)]
        posts = app[STATS].posts
    assert len(results) == 20
    # Exactly one booking per request sent, spaced 1/rate apart whichever worker made it.
    assert len(limiter.delays) == posts == 20
    assert limiter.delays == sorted(limiter.delays)
    assert limiter.delays[:3] == pytest.approx([0.0, 0.0002, 0.0004])


async def test_a_shared_rate_budget_is_spent_only_on_requests_sent() -> None:
    # Issue 12.1: every worker used to book a slot before it knew it had input, so the
    # workers that found the input exhausted spent the budget the other map needed.
    class NoWait(CountingLimiter):
        async def acquire(self) -> None:  # book, but never sleep: the test counts bookings
            self.reserve()

    limiter = NoWait(20, burst=5)
    app = create_app(ServerConfig())
    async with serve(app) as url, AsyncClient(url, max_concurrency=16) as client:

        async def one_map(prefix: str, n: int) -> list[BatchResult]:
            items = [f"{prefix}{i}" for i in range(n)]
            return [r async for r in client.map(items, concurrency=16, rate_limit=limiter)]

        a, b = await asyncio.gather(one_map("a", 7), one_map("b", 5))
        posts = app[STATS].posts
    assert all(r.ok for r in a + b) and len(a) == 7 and len(b) == 5
    assert len(limiter.delays) == posts == 12


async def test_a_rate_limited_map_ends_with_its_last_result() -> None:
    # Three items fit in the burst; any fourth booking would wait 1000 s. The map must end
    # once the three results are out (it used to sleep on slots booked by idle workers).
    limiter = RateLimiter(0.001, burst=3, clock=lambda: 0.0)
    async with serve(ServerConfig()) as url, AsyncClient(url) as client:

        async def consume() -> list[BatchResult]:
            return [r async for r in client.map(["a", "b", "c"], rate_limit=limiter)]

        results = await asyncio.wait_for(consume(), 60)  # a guard against a hang, not a timing
    assert len(results) == 3 and all(r.ok for r in results)
    assert worker_tasks() == []
    assert limiter.reserve() == 1000.0  # only three slots were ever booked


@pytest.mark.parametrize("order", ["tail first", "head first"])
async def test_a_cancelled_rate_wait_gives_its_slot_back(order: str) -> None:
    limiter = RateLimiter(1, clock=lambda: 0.0)  # a frozen clock: slots at 0, 1, 2, ...
    assert limiter.reserve() == 0.0
    head = asyncio.ensure_future(limiter.acquire())  # waits 1 s
    tail = asyncio.ensure_future(limiter.acquire())  # waits 2 s
    await asyncio.sleep(0)
    for waiter in (tail, head) if order == "tail first" else (head, tail):
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert limiter.reserve() == 1.0  # both slots are free again
    middle = asyncio.ensure_future(limiter.acquire())  # waits 2 s
    last = asyncio.ensure_future(limiter.acquire())  # waits 3 s
    await asyncio.sleep(0)
    middle.cancel()  # not the tail: its slot stays booked, the later one is not moved
    with pytest.raises(asyncio.CancelledError):
        await middle
    assert limiter.reserve() == 4.0
    last.cancel()
    with pytest.raises(asyncio.CancelledError):
        await last


async def test_concurrency_above_the_client_cap_is_refused() -> None:
    # The one rule (docs/batch.md): the client's max_concurrency caps requests in flight;
    # asking a map for more is an error naming both numbers, never a silent cap.
    async with AsyncClient("http://127.0.0.1:9/", max_concurrency=32) as client:
        with pytest.raises(ConfigError, match=r"concurrency=64 exceeds .*max_concurrency=32"):
            client.map(["a"], concurrency=64)
        with pytest.raises(
            ConfigError, match=r"AdaptiveConcurrency\(maximum=64\) exceeds .*max_concurrency=32"
        ):
            client.map(["a"], adaptive=AdaptiveConcurrency(64))
        with pytest.raises(ConfigError, match=r"concurrency=8 exceeds window=4"):
            client.map(["a"], concurrency=8, window=4)
        with pytest.raises(
            ConfigError, match=r"AdaptiveConcurrency\(maximum=16\) exceeds concurrency=8"
        ):
            client.map(["a"], concurrency=8, adaptive=AdaptiveConcurrency(16))
        with pytest.raises(ConfigError, match="adaptive must be"):
            client.map(["a"], adaptive=3)  # type: ignore[arg-type]
        await client.map([], concurrency=32, adaptive=AdaptiveConcurrency(32)).aclose()


async def test_concurrency_up_to_the_cap_is_honoured() -> None:
    async with recorder_endpoint() as (url, rec), AsyncClient(url, max_concurrency=6) as client:
        results = client.map(counting(None, [0], "block"), concurrency=6)
        consumer = asyncio.create_task(anext(results))
        await rec.until(lambda: rec.blocked == 6)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await results.aclose()
        await rec.until(lambda: rec.disconnects == 6)


async def test_adaptive_sees_only_its_own_calls_failures() -> None:
    # Each call's attempts travel with that call: another map's 429s on the same client
    # do not cut this map's limit.
    async with recorder_endpoint() as (url, _), AsyncClient(url, max_retries=0) as client:
        limiter = AdaptiveConcurrency(4)

        async def busy() -> list[BatchResult]:
            return [r async for r in client.map([f"busy{i}" for i in range(8)], concurrency=4)]

        async def calm() -> list[BatchResult]:
            return [r async for r in client.map([f"c{i}" for i in range(8)], adaptive=limiter)]

        rejected, fine = await asyncio.gather(busy(), calm())
        assert all(isinstance(r.error, StatusError) for r in rejected)
        assert all(r.error.status_code == 429 for r in rejected if isinstance(r.error, StatusError))
        assert all(r.ok for r in fine)
        assert limiter.decreases == 0 and limiter.limit == 4
        # ... while its own 429s do.
        own = [r async for r in client.map(["busy-own", "x"], ordered=True, adaptive=limiter)]
        assert isinstance(own[0].error, StatusError) and own[1].ok
        assert limiter.decreases == 1


async def test_progress_callback_counts() -> None:
    calls: list[tuple[int, int | None, int]] = []
    async with recorder_endpoint() as (url, _), AsyncClient(url) as client:
        prompts = ["a", "bad1", "b", "bad2", "c"]
        async for _ in client.map(prompts, on_progress=lambda *a: calls.append(a)):
            pass
        assert [c[0] for c in calls] == [1, 2, 3, 4, 5]
        assert {c[1] for c in calls} == {5}
        assert calls[-1][2] == 2
        calls.clear()
        async for _ in client.map(iter(prompts), on_progress=lambda *a: calls.append(a)):
            pass
        assert calls[-1] == (5, None, 2)


async def test_progress_bar_uses_tqdm(capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(ServerConfig()) as url, AsyncClient(url) as client:
        async for _ in client.map(["a", "b", "c"], progress=True):
            pass
    err = capsys.readouterr().err
    assert "3/3" in err and "prompt" in err


async def test_progress_without_tqdm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    async with AsyncClient("http://127.0.0.1:9/") as client:
        with pytest.raises(ConfigError, match=r"progress=True needs tqdm; install it with: pip"):
            client.map(["a"], progress=True)


def test_importing_modal_llm_does_not_import_tqdm() -> None:
    code = "import sys, modal_llm, modal_llm._fanout; print(json.dumps('tqdm' in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) is False


async def test_map_yields_batch_results(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if body["prompt"] == "bad":
            return web.Response(status=400, text="no")
        return web.json_response({"prompt": body["prompt"].upper() + str(body.get("n", ""))})

    items = ["a", {"prompt": "b", "id": "x", "n": 2}, "bad"]
    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        results = [r async for r in c.map(iter(items), ordered=True)]
    assert [r.text for r in results] == ["A", "B2", None]
    assert [r.id for r in results] == [0, "x", 2]
    assert isinstance(results[2].error, StatusError)
    assert results[0].attempts == 1


@pytest.mark.parametrize("shared", ["adaptive", "rate_limit"])
def test_a_limiter_shared_by_clients_on_other_threads_never_hangs(shared: str) -> None:
    """One AdaptiveConcurrency (or RateLimiter) for two blocking Clients, each on its own
    loop thread: a turn freed on one loop wakes a waiter on the other (review R12: the
    waiter's loop was never woken, so a map waited forever)."""
    import threading

    from modal_llm import Client, RateLimiter
    from modal_llm.testing import LocalEndpoint

    limiter: object = AdaptiveConcurrency(1) if shared == "adaptive" else RateLimiter(1000)
    results: list[list[bool]] = []
    with LocalEndpoint() as endpoint:

        def work() -> None:
            with Client(endpoint.url) as client:
                options: dict[str, Any] = {shared: limiter}
                results.append([r.ok for r in client.map(["a"] * 20, **options)])

        threads = [threading.Thread(target=work, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)  # a bound on a hang, not a timing assert
        assert not any(thread.is_alive() for thread in threads), "a map hangs"
    assert results == [[True] * 20, [True] * 20]
    if isinstance(limiter, AdaptiveConcurrency):
        assert limiter.in_flight == 0
