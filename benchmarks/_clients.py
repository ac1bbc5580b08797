"""The clients under test, each behind one small opener, and the registry that names them.

A batch opener is a context manager yielding ``run(prompts) -> number of good replies``; a
stream opener yields ``run(prompt) -> (seconds to first piece, pieces)``; a timed-stream
opener (workload 6) yields ``run(prompt, delays, offset) -> pieces``, which stores each
piece's delivery delay (ns since the server wrote it, the timestamp the piece carries) in
``delays[offset + k]``. Every library is imported inside its opener, so a worker process
loads only the client it measures.

modal-llm openers look each name up first and raise ``Unavailable`` when it does not exist
yet in this checkout, so one missing API is reported as "not available" and the rest run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import (
        AsyncIterator,
        Awaitable,
        Callable,
        Iterable,
        Iterator,
        MutableSequence,
    )
    from contextlib import AbstractAsyncContextManager, AbstractContextManager

    AsyncRun = Callable[[Iterable[str]], Awaitable[int]]
    SyncRun = Callable[[Iterable[str]], int]
    StreamRun = Callable[[str], Awaitable[tuple[float, int]]]
    AsyncOpener = Callable[[str, int], AbstractAsyncContextManager[AsyncRun]]
    SyncOpener = Callable[[str, int], AbstractContextManager[SyncRun]]
    StreamOpener = Callable[[str, int], AbstractAsyncContextManager[StreamRun]]
    TimedRun = Callable[[str, MutableSequence[int], int], Awaitable[int]]
    TimedOpener = Callable[[str, int], AbstractAsyncContextManager[TimedRun]]

# The fixed nginx reply starts with the throughput prompt: langchain_community's Modal only
# accepts replies that contain the prompt it sent.
THROUGHPUT_PROMPT = "benchmark prompt"
NGINX_REPLY_TEXT = "benchmark prompt: a fixed reply from nginx, about one short sentence long."
# Stream prompts are long because the reference server echoes the prompt and splits its
# answer into at most len(text) pieces: 200 pieces need 200+ characters.
STREAM_PROMPT_FILLER = " ".join(["tell me a long story about the sea and the stars"] * 5)
STREAM_ACCEPT = "text/event-stream, application/x-ndjson, text/plain, application/json"

# Things worth saying in the report about how a client was driven, filled in by openers.
NOTES: list[str] = []


class Unavailable(Exception):
    """The client, or the method a runner needs, does not exist (yet) in this checkout."""


def as_list(prompts: Iterable[str]) -> list[str]:
    """LangChain's batches take a list: the caller's own when it has one (the memory
    workload hands every client the same list, made before the baseline), else one here."""
    return prompts if isinstance(prompts, list) else list(prompts)


def count_good(texts: Iterable[object]) -> int:
    """Count replies that are non-empty strings: a run that returns junk must not score."""
    return sum(1 for text in texts if isinstance(text, str) and text)


def _is_good(item: object) -> bool:
    """Judge one item from the fan-out iterator, whatever shape it has (str or result)."""
    if isinstance(item, BaseException) or item is None:
        return False
    if isinstance(item, str):
        return bool(item)
    if isinstance(item, tuple):
        return bool(item) and _is_good(item[-1])
    for attr in ("error", "exception"):
        if getattr(item, attr, None) is not None:
            return False
    text = getattr(item, "text", None)
    return text is None or _is_good(text)


def _in_threads(call: Callable[[str], object], prompts: Iterable[str], threads: int) -> int:
    """``threads`` threads share ``call``, each taking the next prompt until none is left;
    return the good replies. No executor in between: each call's only hand-offs are the
    client's own, as when a service's request threads share one client."""
    source = iter(prompts)
    lock = threading.Lock()
    good = [0] * threads
    errors: list[BaseException] = []

    def work(k: int) -> None:
        n = 0
        try:
            while True:
                with lock:
                    prompt = next(source, None)
                if prompt is None:
                    break
                text = call(prompt)
                n += isinstance(text, str) and bool(text)
        except BaseException as exc:
            errors.append(exc)
        good[k] = n

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sum(good)


def import_modal_llm() -> Any:
    try:
        import modal_llm
    except ImportError as exc:
        raise Unavailable(f"import modal_llm failed: {exc}") from exc
    return modal_llm


def _require(obj: object, name: str, owner: str) -> Any:
    value = getattr(obj, name, None)
    if value is None:
        raise Unavailable(f"{owner}.{name} is not available yet")
    return value


# --- peers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_aiohttp(url: str, concurrency: int) -> AsyncIterator[AsyncRun]:
    """Raw aiohttp, the ceiling: one session, a sized connector, a semaphore, json.loads."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        sem = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> object:
            async with sem, session.post(url, json={"prompt": prompt}) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                body = await resp.read()
            return json.loads(body)["prompt"]

        async def run(prompts: Iterable[str]) -> int:
            return count_good(await asyncio.gather(*(one(p) for p in prompts)))

        yield run


@contextlib.asynccontextmanager
async def open_aiohttp_stream(url: str, concurrency: int) -> AsyncIterator[StreamRun]:
    """Raw aiohttp reading SSE lines: the baseline for streaming."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        headers = {"Accept": STREAM_ACCEPT}

        async def run(prompt: str) -> tuple[float, int]:
            start = time.perf_counter()
            first = math.nan
            pieces = 0
            done = False
            body = {"prompt": prompt, "stream": True}
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    if json.loads(data)["prompt"]:
                        if not pieces:
                            first = time.perf_counter() - start
                        pieces += 1
            if not done:
                raise RuntimeError(f"stream ended without [DONE] after {pieces} pieces")
            return first, pieces

        yield run


@contextlib.asynccontextmanager
async def open_aiohttp_timed(url: str, concurrency: int) -> AsyncIterator[TimedRun]:
    """Raw aiohttp reading SSE lines, recording each piece's delay: workload 6's baseline."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = {"Accept": STREAM_ACCEPT}
        now = time.monotonic_ns

        async def run(prompt: str, delays: MutableSequence[int], offset: int) -> int:
            pieces = 0
            done = False
            body = {"prompt": prompt, "stream": True}
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    text = json.loads(data)["prompt"]
                    delays[offset + pieces] = now() - int(text)
                    pieces += 1
            if not done:
                raise RuntimeError(f"stream ended without [DONE] after {pieces} pieces")
            return pieces

        yield run


@contextlib.asynccontextmanager
async def open_httpx(url: str, concurrency: int) -> AsyncIterator[AsyncRun]:
    """httpx.AsyncClient (openai-python's transport) with limits sized to the concurrency."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> object:
            async with sem:
                resp = await client.post(url, json={"prompt": prompt})
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}")
            return json.loads(resp.content)["prompt"]

        async def run(prompts: Iterable[str]) -> int:
            return count_good(await asyncio.gather(*(one(p) for p in prompts)))

        yield run


@contextlib.contextmanager
def open_requests(url: str, concurrency: int) -> Iterator[SyncRun]:
    """requests.Session shared by as many threads as the concurrency."""
    import requests
    from requests.adapters import HTTPAdapter

    with requests.Session() as session:
        session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=concurrency))

        def one(prompt: str) -> object:
            resp = session.post(url, json={"prompt": prompt}, timeout=120)
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}")
            return json.loads(resp.content)["prompt"]

        def run(prompts: Iterable[str]) -> int:
            return _in_threads(one, prompts, concurrency)

        yield run


def _incumbent(url: str) -> Any:
    from langchain_community.llms import Modal

    # langchain-community 0.4.x under pydantic 2: Modal(endpoint_url=...) moves the URL into
    # model_kwargs (its field-alias check sees None), so it would POST to "" and send the URL
    # in the body. Setting the attribute after construction is the working way.
    llm = Modal()
    llm.endpoint_url = url
    note = "incumbent: endpoint_url set after construction (constructor drops it, pydantic 2)"
    if note not in NOTES:
        NOTES.append(note)
    return llm


@contextlib.asynccontextmanager
async def open_incumbent_abatch(url: str, concurrency: int) -> AsyncIterator[AsyncRun]:
    """langchain_community.llms.Modal.abatch with config max_concurrency."""
    llm = _incumbent(url)

    async def run(prompts: Iterable[str]) -> int:
        return count_good(
            await llm.abatch(as_list(prompts), config={"max_concurrency": concurrency})
        )

    yield run


@contextlib.contextmanager
def open_incumbent_batch(url: str, concurrency: int) -> Iterator[SyncRun]:
    """langchain_community.llms.Modal.batch with config max_concurrency."""
    llm = _incumbent(url)

    def run(prompts: Iterable[str]) -> int:
        return count_good(llm.batch(as_list(prompts), config={"max_concurrency": concurrency}))

    yield run


# --- modal-llm -------------------------------------------------------------------------------


def _async_client(url: str, concurrency: int) -> Any:
    """AsyncClient with default settings except max_concurrency (retries on, as shipped)."""
    client_cls = _require(import_modal_llm(), "AsyncClient", "modal_llm")
    return client_cls(url, max_concurrency=concurrency)


@contextlib.asynccontextmanager
async def open_mllm_many(url: str, concurrency: int) -> AsyncIterator[AsyncRun]:
    """modal-llm AsyncClient.generate_many."""
    async with _async_client(url, concurrency) as client:
        generate_many = _require(client, "generate_many", "AsyncClient")

        async def run(prompts: Iterable[str]) -> int:
            return count_good(await generate_many(prompts))

        yield run


@contextlib.asynccontextmanager
async def open_mllm_generate(url: str, concurrency: int) -> AsyncIterator[AsyncRun]:
    """modal-llm AsyncClient.generate under the caller's own semaphore."""
    async with _async_client(url, concurrency) as client:
        generate = _require(client, "generate", "AsyncClient")
        sem = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> object:
            async with sem:
                return await generate(prompt)

        async def run(prompts: Iterable[str]) -> int:
            return count_good(await asyncio.gather(*(one(p) for p in prompts)))

        yield run


@contextlib.asynccontextmanager
async def open_mllm_map(
    url: str, concurrency: int, *, ordered: bool = False
) -> AsyncIterator[AsyncRun]:
    """modal-llm fan-out iterator: ``async for result in client.map(prompts)``."""
    async with _async_client(url, concurrency) as client:
        fan_out = _require(client, "map", "AsyncClient")
        options = {"ordered": True} if ordered else {}

        async def run(prompts: Iterable[str]) -> int:
            results = fan_out(prompts, **options)
            if not hasattr(results, "__aiter__"):
                results = await results
            good = 0
            async for item in results:
                # BatchResult.ok and .text: as cheap as raw aiohttp's count of its replies.
                ok = getattr(item, "ok", None)
                good += bool(ok and item.text) if ok is not None else _is_good(item)
            return good

        yield run


def open_mllm_map_ordered(url: str, concurrency: int) -> AbstractAsyncContextManager[AsyncRun]:
    """modal-llm fan-out iterator in input order: ``client.map(prompts, ordered=True)``."""
    return open_mllm_map(url, concurrency, ordered=True)


@contextlib.contextmanager
def open_mllm_sync(url: str, concurrency: int) -> Iterator[SyncRun]:
    """modal-llm blocking Client shared by as many threads as the concurrency."""
    client_cls = _require(import_modal_llm(), "Client", "modal_llm")
    with contextlib.ExitStack() as stack:
        client = client_cls(url, max_concurrency=concurrency)
        if hasattr(client, "__enter__"):
            stack.enter_context(client)
        else:
            stack.callback(client.close)
        generate = _require(client, "generate", "Client")

        def run(prompts: Iterable[str]) -> int:
            return _in_threads(generate, prompts, concurrency)

        yield run


@contextlib.asynccontextmanager
async def open_mllm_langchain(url: str, concurrency: int) -> AsyncIterator[AsyncRun]:
    """modal_llm.langchain.Modal.abatch with config max_concurrency."""
    import_modal_llm()
    try:
        from modal_llm.langchain import Modal  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise Unavailable(f"modal_llm.langchain is not available yet: {exc}") from exc
    llm: Any
    try:
        llm = Modal(endpoint_url=url, max_concurrency=concurrency)
    except Exception:
        llm = Modal(endpoint_url=url)
        note = "mllm-langchain: Modal takes no max_concurrency; abatch config only"
        if note not in NOTES:
            NOTES.append(note)
    try:

        async def run(prompts: Iterable[str]) -> int:
            config = {"max_concurrency": concurrency}
            return count_good(await llm.abatch(as_list(prompts), config=config))

        yield run
    finally:
        for closer in ("aclose", "close"):
            method = getattr(llm, closer, None)
            if callable(method):
                outcome = method()
                if asyncio.iscoroutine(outcome):
                    await outcome
                break


@contextlib.asynccontextmanager
async def open_mllm_stream(url: str, concurrency: int) -> AsyncIterator[StreamRun]:
    """modal-llm ``async for piece in client.stream(prompt)``."""
    async with _async_client(url, concurrency) as client:
        stream = _require(client, "stream", "AsyncClient")

        async def run(prompt: str) -> tuple[float, int]:
            start = time.perf_counter()
            first = math.nan
            pieces = 0
            async for piece in stream(prompt):
                if piece:
                    if not pieces:
                        first = time.perf_counter() - start
                    pieces += 1
            return first, pieces

        yield run


@contextlib.asynccontextmanager
async def open_mllm_timed(url: str, concurrency: int) -> AsyncIterator[TimedRun]:
    """modal-llm ``client.stream(prompt)``, recording each piece's delay (workload 6)."""
    async with _async_client(url, concurrency) as client:
        stream = _require(client, "stream", "AsyncClient")
        now = time.monotonic_ns

        async def run(prompt: str, delays: MutableSequence[int], offset: int) -> int:
            pieces = 0
            async for piece in stream(prompt):
                delays[offset + pieces] = now() - int(piece)
                pieces += 1
            return pieces

        yield run


from benchmarks._langchain import (  # noqa: E402
    open_chat,
    open_chat_ascompleted,
    open_langchain_ascompleted,
    open_langchain_config,
)

# --- registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    """How to run one client: its openers, the modules to import first, the event loop."""

    name: str
    label: str
    family: Literal["peer", "modal-llm"]
    imports: tuple[str, ...]
    batch_async: AsyncOpener | None = None
    batch_sync: SyncOpener | None = None
    stream: StreamOpener | None = None
    timed_stream: TimedOpener | None = None
    # "modal_llm.run": the coroutine runs under modal_llm.run(..., uvloop=True), the public
    # way to get uvloop (the speed extra); "uvloop": a bare uvloop loop.
    loop: Literal["asyncio", "uvloop", "modal_llm.run"] = "asyncio"
    # Requests per throughput run relative to the others (the incumbent is sequential).
    count_scale: float = 1.0


# What modal-llm loads on first use rather than on ``import modal_llm`` (the JSON codec, the
# fan-out engine, streams, the blocking Client): imported before the memory baseline like
# any other client's modules, so a one-time import (pydantic-core's extension is ~4 MB) is
# not counted as memory per request or per open stream.
MLLM: tuple[str, ...] = (
    "modal_llm", "pydantic_core", "modal_llm._fanout", "modal_llm._progress",
    "modal_llm._streaming", "modal_llm._sync", "modal_llm._portal",
)  # fmt: skip

CLIENTS: dict[str, ClientSpec] = {
    spec.name: spec
    for spec in (
        ClientSpec("aiohttp", "raw aiohttp (ceiling)", "peer", ("aiohttp",), open_aiohttp,
                   stream=open_aiohttp_stream, timed_stream=open_aiohttp_timed),
        ClientSpec("httpx", "httpx.AsyncClient", "peer", ("httpx",), open_httpx),
        ClientSpec("requests", "requests.Session + threads", "peer", ("requests",),
                   batch_sync=open_requests),
        ClientSpec("incumbent", "langchain_community Modal.abatch", "peer",
                   ("langchain_community.llms",), open_incumbent_abatch, count_scale=0.05),
        ClientSpec("incumbent-batch", "langchain_community Modal.batch", "peer",
                   ("langchain_community.llms",), batch_sync=open_incumbent_batch,
                   count_scale=0.05),
        ClientSpec("mllm-many", "modal-llm generate_many", "modal-llm", MLLM,
                   open_mllm_many),
        ClientSpec("mllm-generate", "modal-llm generate + semaphore", "modal-llm",
                   MLLM, open_mllm_generate),
        ClientSpec("mllm-map", "modal-llm client.map (unordered)", "modal-llm",
                   MLLM, open_mllm_map),
        ClientSpec("mllm-map-ordered", "modal-llm client.map(ordered=True)", "modal-llm",
                   MLLM, open_mllm_map_ordered),
        ClientSpec("mllm-sync", "modal-llm Client + threads", "modal-llm", MLLM,
                   batch_sync=open_mllm_sync),
        # LangChain rows import langchain-core before the memory baseline: the import's own
        # RSS (about 30 MB) is not the fan-out's.
        ClientSpec("mllm-langchain", "modal_llm.langchain Modal.abatch", "modal-llm",
                   (*MLLM, "modal_llm.langchain"), open_mllm_langchain),
        ClientSpec("mllm-langchain-config", "Modal.abatch, config max_concurrency only",
                   "modal-llm", (*MLLM, "modal_llm.langchain"), open_langchain_config),
        ClientSpec("mllm-chat", "ChatModal.abatch, config max_concurrency only", "modal-llm",
                   (*MLLM, "modal_llm.langchain"), open_chat),
        ClientSpec("mllm-langchain-ascompleted", "Modal.abatch_as_completed, counted",
                   "modal-llm", (*MLLM, "modal_llm.langchain"), open_langchain_ascompleted),
        ClientSpec("mllm-chat-ascompleted", "ChatModal.abatch_as_completed, counted",
                   "modal-llm", (*MLLM, "modal_llm.langchain"), open_chat_ascompleted),
        ClientSpec("mllm-stream", "modal-llm client.stream", "modal-llm", MLLM,
                   stream=open_mllm_stream, timed_stream=open_mllm_timed),
        ClientSpec("mllm-many-uvloop", "modal-llm generate_many, modal_llm.run (uvloop)",
                   "modal-llm", (*MLLM, "uvloop"), open_mllm_many, loop="modal_llm.run"),
        ClientSpec("aiohttp-uvloop", "raw aiohttp, uvloop", "peer", ("aiohttp", "uvloop"),
                   open_aiohttp, loop="uvloop"),
    )
}  # fmt: skip
