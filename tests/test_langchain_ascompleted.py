"""``abatch_as_completed`` / ``batch_as_completed`` of ``Modal`` and ``ChatModal`` over real HTTP.

Each result comes as ``(index, output)`` when it is done, every index once; memory stays
bounded by the concurrency (at most twice it pulled from the inputs and not yet yielded);
errors stay per input or stop the batch; callbacks fire per input; leaving early cancels
the work in flight. Async tests run an endpoint on the test's own loop; sync tests use the
threaded one. Cancellation and bounds are shown by events and counts, never by timing.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any, overload

import pytest
from aiohttp import web
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage

from modal_llm import StatusError
from modal_llm.langchain import ChatModal, Modal
from modal_llm.server import serve

from .endpoints import WAIT, ThreadedEndpoint

Model = Modal | ChatModal


class Endpoint:
    """An endpoint on the test's loop. By prompt prefix: ``hold`` waits for ``release``;
    ``gate`` waits until ``gate_at`` requests are in flight together; ``fail`` answers
    422 (``fail late``: once a ``hold`` request has arrived); anything else is echoed as
    ``"<prompt> ::"``. Counts requests in flight (and the most at once) and disconnects."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.gate = asyncio.Event()
        self.changed = asyncio.Event()
        self.gate_at = 1
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most = 0
        self.held = 0
        self.disconnects = 0

    def _note(self) -> None:
        self.changed.set()
        if self.in_flight >= self.gate_at:
            self.gate.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), WAIT)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt: str = body["prompt"]
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self._note()
        try:
            if prompt.startswith("fail"):
                if prompt.startswith("fail late"):
                    await self.until(lambda: self.held > 0)
                return web.json_response({"detail": "rejected"}, status=422)
            if prompt.startswith("gate"):
                await asyncio.wait_for(self.gate.wait(), WAIT)
            if prompt.startswith("hold"):
                self.held += 1
                self._note()
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    self.disconnects += 1
                    self._note()
                    raise
            return web.json_response({"prompt": f"{prompt} ::"})
        finally:
            self.in_flight -= 1
            self._note()


@asynccontextmanager
async def loop_endpoint() -> AsyncIterator[tuple[str, Endpoint]]:
    endpoint = Endpoint()
    app = web.Application()
    app.router.add_post("/", endpoint.handle)
    async with serve(app) as url:
        yield url, endpoint
        endpoint.release.set()


def last_text(messages: Sequence[BaseMessage]) -> str:
    """ChatModal's formatter here: the last message's text, so the prefixes above work."""
    return str(messages[-1].text)


def make(kind: str, url: str, **fields: Any) -> Model:
    if kind == "chat":
        return ChatModal(endpoint_url=url, max_retries=0, formatter=last_text, **fields)
    return Modal(endpoint_url=url, max_retries=0, **fields)


def text(output: Any) -> Any:
    """What a reply says: ``Modal``'s is a str, ``ChatModal``'s an ``AIMessage``."""
    if isinstance(output, AIMessage):
        return output.content
    return output


class Runs(BaseCallbackHandler):
    """Counts LangChain runs, their ends and their errors."""

    run_inline = True

    def __init__(self) -> None:
        self.starts = 0
        self.ends = 0
        self.errors: list[BaseException] = []

    def on_llm_start(self, *args: Any, **kw: Any) -> None:
        self.starts += 1

    def on_chat_model_start(self, *args: Any, **kw: Any) -> None:
        self.starts += 1

    def on_llm_end(self, *args: Any, **kw: Any) -> None:
        self.ends += 1

    def on_llm_error(self, error: BaseException, **kw: Any) -> None:
        self.errors.append(error)


class Counted(Sequence[str]):
    """``prefix0, prefix1, ...``; ``pulled`` is one more than the highest index read."""

    def __init__(self, n: int, prefix: str = "p") -> None:
        self.n = n
        self.prefix = prefix
        self.pulled = 0

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            raise TypeError("not sliced here")
        if not 0 <= index < self.n:
            raise IndexError(index)
        self.pulled = max(self.pulled, index + 1)
        return f"{self.prefix}{index}"


KINDS = pytest.mark.parametrize("kind", ["llm", "chat"])
OBSERVED = pytest.mark.parametrize("observed", [False, True], ids=["quiet", "callbacks"])


def workers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if "as_completed_bounded" in repr(t.get_coro())]


# -- async --------------------------------------------------------------------------------


@KINDS
@OBSERVED
async def test_results_come_as_they_finish_every_index_once(kind: str, observed: bool) -> None:
    async with loop_endpoint() as (url, endpoint):
        model = make(kind, url)
        runs = Runs()
        config: Any = {"callbacks": [runs]} if observed else None
        inputs: list[Any] = ["hold 0", "b", "c", "d"]
        seen: list[tuple[int, Any]] = []
        async for index, output in model.abatch_as_completed(inputs, config):
            seen.append((index, output))
            if len(seen) == 3:
                endpoint.release.set()  # the held first input finishes last
        assert [i for i, _ in seen][-1] == 0
        assert sorted(i for i, _ in seen) == [0, 1, 2, 3]
        assert {i: text(o) for i, o in seen} == {i: f"{p} ::" for i, p in enumerate(inputs)}
        assert {type(o) for _, o in seen} == {AIMessage if kind == "chat" else str}
        assert runs.starts == runs.ends == (4 if observed else 0)


@KINDS
async def test_same_outputs_as_abatch(kind: str) -> None:
    async with loop_endpoint() as (url, endpoint):
        model = make(kind, url, max_concurrency=4)
        inputs: list[Any] = [f"q{i}" for i in range(50)]
        batch = await model.abatch(inputs, stop=[" ::"])
        sent = sorted(endpoint.bodies, key=str)
        endpoint.bodies.clear()
        found: dict[int, Any] = {}
        async for index, output in model.abatch_as_completed(inputs, stop=[" ::"]):
            assert index not in found
            found[index] = output
        assert [text(found[i]) for i in range(50)] == [text(o) for o in batch] == inputs
        assert sorted(endpoint.bodies, key=str) == sent


@KINDS
@OBSERVED
async def test_memory_is_bounded_by_the_concurrency(kind: str, observed: bool) -> None:
    async with loop_endpoint() as (url, endpoint):
        model = make(kind, url)
        inputs = Counted(600)
        config: Any = {"max_concurrency": 3}
        if observed:
            config["callbacks"] = [Runs()]
        before = len(asyncio.all_tasks())
        seen: set[int] = set()
        async for index, output in model.abatch_as_completed(inputs, config):
            assert index not in seen
            seen.add(index)
            assert text(output) == f"p{index} ::"
            # At most twice the concurrency pulled ahead of the consumer; LangChain's own
            # reads every input (and starts a coroutine for each) before its first result.
            assert inputs.pulled <= len(seen) + 2 * 3
            assert len(workers()) <= 3
            assert len(asyncio.all_tasks()) - before <= 3 + 3 * 4  # workers, server handlers
            if len(seen) % 50 == 0:  # a slow consumer: let every request in flight finish
                await endpoint.until(lambda: endpoint.in_flight == 0)
                assert inputs.pulled <= len(seen) + 2 * 3
        assert seen == set(range(600))
        assert endpoint.most <= 3
        assert not workers()


@KINDS
@OBSERVED
async def test_config_max_concurrency_is_honoured(kind: str, observed: bool) -> None:
    async with loop_endpoint() as (url, endpoint):
        model = make(kind, url)
        endpoint.gate_at = 5  # opens only once 5 are in flight together
        config: Any = {"max_concurrency": 5}
        if observed:
            config["callbacks"] = [Runs()]
        inputs: list[Any] = [f"gate {i}" for i in range(15)]
        found = {i: text(o) async for i, o in model.abatch_as_completed(inputs, config)}
        assert found == {i: f"gate {i} ::" for i in range(15)}
        assert endpoint.most == 5


@KINDS
async def test_the_field_is_the_default_limit_and_above_it_the_config_wins(kind: str) -> None:
    async with loop_endpoint() as (url, endpoint):
        model = make(kind, url, max_concurrency=4)
        endpoint.gate_at = 4
        inputs: list[Any] = [f"gate {i}" for i in range(8)]
        assert len([x async for x in model.abatch_as_completed(inputs)]) == 8
        assert endpoint.most == 4
        endpoint.gate.clear()
        endpoint.gate_at = 40  # above the field: a client whose cap allows it
        inputs = [f"gate {i}" for i in range(80)]
        found = [x async for x in model.abatch_as_completed(inputs, {"max_concurrency": 40})]
        assert len(found) == 80
        assert endpoint.most == 40


@KINDS
@OBSERVED
async def test_errors_stay_per_input(kind: str, observed: bool) -> None:
    async with loop_endpoint() as (url, _):
        model = make(kind, url)
        runs = Runs()
        config: Any = {"callbacks": [runs]} if observed else None
        inputs: list[Any] = ["a", "fail b", "c", "fail d"]
        found = {
            i: text(o)
            async for i, o in model.abatch_as_completed(inputs, config, return_exceptions=True)
        }
        assert sorted(found) == [0, 1, 2, 3]
        assert found[0] == "a ::" and found[2] == "c ::"
        assert isinstance(found[1], StatusError) and isinstance(found[3], StatusError)
        assert found[1] is not found[3]
        assert len(runs.errors) == (2 if observed else 0)


@KINDS
@OBSERVED
async def test_without_return_exceptions_the_first_error_stops_the_rest(
    kind: str, observed: bool
) -> None:
    async with loop_endpoint() as (url, endpoint):
        model = make(kind, url)
        config: Any = {"callbacks": [Runs()]} if observed else None
        inputs: list[Any] = ["hold a", "fail late b", "hold c"]
        seen: list[int] = []
        with pytest.raises(StatusError):
            async for index, _ in model.abatch_as_completed(inputs, config):
                seen.append(index)
        assert seen == []
        # The held requests were cancelled: their connections went away, unreleased.
        await endpoint.until(lambda: endpoint.in_flight == 0)
        assert endpoint.disconnects == endpoint.held >= 1
        assert not workers()


@KINDS
@OBSERVED
@pytest.mark.parametrize("leave", ["aclose", "break"])
async def test_leaving_early_cancels_the_work_in_flight(
    kind: str, observed: bool, leave: str
) -> None:
    async with loop_endpoint() as (url, endpoint):
        model = make(kind, url)
        config: Any = {"max_concurrency": 3}
        if observed:
            config["callbacks"] = [Runs()]
        inputs: list[Any] = ["hold a", "hold b", "c", *(f"d{i}" for i in range(20))]
        results = model.abatch_as_completed(inputs, config)
        if leave == "aclose":
            async with aclosing(results):
                async for index, _ in results:
                    assert index == 2
                    break
        else:
            async for index, _ in results:
                assert index == 2
                break
            del results  # the loop's async-generator finalizer closes it
            gc.collect()
        await endpoint.until(lambda: endpoint.disconnects == 2)
        await endpoint.until(lambda: endpoint.in_flight == 0)
        # After a break the close runs in a task of the loop's own (the finalizer's): the
        # endpoint can see the disconnects before the cancelled workers have unwound
        # (always so on Python 3.12+), so wait for them to end, then check.
        await asyncio.wait_for(asyncio.gather(*workers(), return_exceptions=True), WAIT)
        assert not workers()
        assert len(endpoint.bodies) <= 3 + 2 * 3  # never the whole input


async def test_empty_and_wrong_config_lists() -> None:
    async with loop_endpoint() as (url, _):
        model = make("llm", url)
        assert [x async for x in model.abatch_as_completed([])] == []
        with pytest.raises(ValueError, match="same length"):
            async for _ in model.abatch_as_completed(["a", "b"], [{}]):
                pass
        configs: Any = [{"callbacks": [Runs()]}, {}]
        found = dict([x async for x in model.abatch_as_completed(["a", "b"], configs)])
        assert found == {0: "a ::", 1: "b ::"}


# -- sync ---------------------------------------------------------------------------------


@pytest.fixture
def threaded() -> Iterator[ThreadedEndpoint]:
    server = ThreadedEndpoint()
    yield server
    server.close()


def echo(prompt: str) -> str:
    return ThreadedEndpoint.answer({"prompt": prompt})


@KINDS
@OBSERVED
def test_sync_results_come_as_they_finish(
    kind: str, observed: bool, threaded: ThreadedEndpoint
) -> None:
    model = make(kind, threaded.url)
    runs = Runs()
    config: Any = {"callbacks": [runs]} if observed else None
    inputs: list[Any] = ["hold: 0", "b", "fail: c", "d"]
    seen: list[tuple[int, Any]] = []
    for index, output in model.batch_as_completed(inputs, config, return_exceptions=True):
        seen.append((index, output))
        if len(seen) == 3:
            threaded.release()
    assert [i for i, _ in seen][-1] == 0
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3]
    found = {i: text(o) for i, o in seen}
    assert isinstance(found.pop(2), StatusError)
    assert found == {i: echo(inputs[i]) for i in (0, 1, 3)}
    assert (runs.starts, len(runs.errors)) == ((4, 1) if observed else (0, 0))
    with pytest.raises(StatusError):
        list(model.batch_as_completed(["a", "fail: b"], config))


@KINDS
def test_sync_honours_max_concurrency_and_stays_bounded(
    kind: str, threaded: ThreadedEndpoint
) -> None:
    model = make(kind, threaded.url)
    threaded.gate_at = 4
    inputs = Counted(40, prefix="gate: ")
    seen: set[int] = set()
    for index, output in model.batch_as_completed(inputs, {"max_concurrency": 4}):
        assert index not in seen
        seen.add(index)
        assert text(output) == echo(f"gate: {index}")
        assert inputs.pulled <= len(seen) + 2 * 4
    assert seen == set(range(40))
    assert threaded.max_in_flight == 4


@KINDS
def test_sync_leaving_early_starts_nothing_more(kind: str, threaded: ThreadedEndpoint) -> None:
    model = make(kind, threaded.url)
    inputs = Counted(100)
    results = model.batch_as_completed(inputs, {"max_concurrency": 2})
    next(results)
    results.close()
    assert inputs.pulled <= 1 + 2 * 2
    assert len(threaded.bodies) <= inputs.pulled
    assert list(model.batch_as_completed([])) == []
