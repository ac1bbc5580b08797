"""``Client``: the blocking face of ``AsyncClient``, driven through a loop on a daemon thread.

There is no HTTP, retry, parsing or streaming logic here. ``_LoopThread`` is a blocking
portal (starlette's ``TestClient`` idea turned around): one daemon thread runs one event
loop that owns the ``AsyncClient``, and every blocking method ships a coroutine there and
waits for its result. The caller's thread never runs a loop, so this works inside a
running one (a Jupyter cell) and from many threads sharing one connection pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, overload

from ._client import AsyncClient
from ._config import (
    USE_CLIENT_DEFAULT,
    ClientOptions,
    ClientSettings,
    TimeoutTypes,
    UseClientDefault,
)
from ._exceptions import ClientClosedError, ModalLLMError, redact_url
from ._fanout import BatchResult, ProgressCallback, PromptLike
from ._pacing import AdaptiveConcurrency, RateLimiter
from ._types import HeaderTypes, StopTypes

if TYPE_CHECKING:
    from typing_extensions import ParamSpec, Unpack

    from ._models import Completion

    P = ParamSpec("P")

__all__ = ["Client"]

T = TypeVar("T")

CANCEL_GRACE: Final = 5.0
"""Seconds a Ctrl-C waits for the cancelled call to unwind (release its connection)."""
CLOSE_TIMEOUT: Final = 10.0
"""Seconds ``close()`` (or exit) waits for the pool to close and the loop thread to end."""
# Windows cannot interrupt a lock wait with Ctrl-C, so the wait is sliced there.
_WAIT_SLICE: Final = 0.25 if sys.platform == "win32" else None
_CLOSED_MESSAGE: Final = "Cannot use a closed client; create a new one."


def _wait_for_result(job: _Job) -> None:
    """Block until the loop has settled ``job``; the one place a Ctrl-C reaches a caller."""
    if _WAIT_SLICE is None:
        job.done.acquire()
        return
    while not job.done.acquire(timeout=_WAIT_SLICE):
        pass


class _Job:
    """One blocking call on its way through the loop: what to run, and its outcome."""

    __slots__ = ("args", "done", "error", "fn", "kwargs", "result", "task")

    def __init__(self, fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.result: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self.done = threading.Lock()
        self.done.acquire()  # released once, by finish(), when the outcome is known

    def finish(self) -> None:
        self.fn = self.args = self.kwargs = None  # type: ignore[assignment]
        self.done.release()

    def cancel(self) -> None:
        """On the loop: Ctrl-C in the caller (its task exists: it was queued first)."""
        if self.task is not None:
            self.task.cancel()


class _LoopThread:
    """A daemon thread running one event loop; ``call`` runs a coroutine there and blocks.

    Strictly private. The coroutine is *created* in the loop thread too, so async
    generators register their finalizers with this loop, not with the caller's.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.closed = False
        # Held while submitting and while closing, so no call is queued behind loop.stop().
        self._submit = threading.Lock()
        self._queue: list[_Job] = []  # calls submitted, not yet started on the loop
        self._wake_scheduled = False  # a _start_queued is on its way to the loop
        self._finished: list[_Job] = []  # settled on the loop, callers not yet woken
        self._thread = threading.Thread(target=self._run, name="modal-llm-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                leftover = asyncio.all_tasks(loop)
                for task in leftover:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                with self._submit:
                    queued = list(self._queue)
                    self._queue.clear()
                for job in queued:  # submitted just before close(): never started
                    job.error = asyncio.CancelledError()
                    job.finish()
                self._release_finished()

    @property
    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``await fn(*args, **kwargs)`` in the loop thread and return its result.

        Ctrl-C while waiting cancels the task (so its connection is released), waits up to
        ``CANCEL_GRACE`` seconds for it to unwind, and re-raises ``KeyboardInterrupt``.
        """
        if self.in_loop_thread:  # it would wait for itself forever
            raise RuntimeError("a blocking Client call cannot run on the client's own loop")
        job = _Job(fn, args, kwargs)
        with self._submit:
            if self.closed:
                raise ClientClosedError(_CLOSED_MESSAGE)
            self._queue.append(job)
            if not self._wake_scheduled:
                self._wake_scheduled = True
                self.loop.call_soon_threadsafe(self._start_queued)
        try:
            _wait_for_result(job)
        except KeyboardInterrupt:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self.loop.call_soon_threadsafe(job.cancel)
            job.done.acquire(timeout=CANCEL_GRACE)
            raise
        error = job.error
        if error is None:
            return job.result  # type: ignore[no-any-return]
        if isinstance(error, asyncio.CancelledError):
            # Only close() cancels tasks behind a caller's back.
            raise ClientClosedError("the client was closed while this call was running") from None
        job.error = None  # no reference cycle through the traceback
        raise error

    # Hand-offs are batched both ways: callers queue their calls and only the first of a
    # batch wakes the loop (call_soon_threadsafe writes to the loop's self-pipe); finished
    # calls wake their callers once per loop iteration, after the loop has done the work
    # that was ready. Waking a blocked thread while holding the GIL is the costly part of
    # a hand-off, and this is what keeps it off the loop's critical path.

    def _start_queued(self) -> None:
        """On the loop: start a task for every queued call (one wake-up per batch)."""
        with self._submit:
            self._wake_scheduled = False
            jobs = list(self._queue)
            self._queue.clear()
            closing = self.closed
        loop = self.loop
        for job in jobs:
            if closing:
                job.error = asyncio.CancelledError()
                job.finish()
            else:
                job.task = loop.create_task(self._run_job(job))

    async def _run_job(self, job: _Job) -> None:
        try:
            job.result = await job.fn(*job.args, **job.kwargs)
        except BaseException as exc:
            job.error = exc
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._finished.append(job)
            if len(self._finished) == 1:
                self.loop.call_soon(self._release_finished)

    def _release_finished(self) -> None:
        """On the loop (or after it closed): wake the callers of every finished call."""
        jobs, self._finished = self._finished, []
        for job in jobs:
            job.finish()

    def stop(self, client: AsyncClient) -> None:
        """Close ``client`` and every task in the loop, stop the loop and join the thread."""
        with self._submit:
            if self.closed:
                return
            self.closed = True
        loop = self.loop
        if self.in_loop_thread:  # garbage-collected on our own thread: cannot wait here
            loop.create_task(_shutdown(client)).add_done_callback(lambda _: loop.stop())
            return
        try:
            future = asyncio.run_coroutine_threadsafe(_shutdown(client), loop)
            with contextlib.suppress(Exception):  # a timeout: stop the loop anyway
                future.result(CLOSE_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(CLOSE_TIMEOUT)

    def close_stream(self, agen: AsyncGenerator[Any, None]) -> None:
        """Close an abandoned stream's async generator (and so its HTTP response)."""
        if self.closed:
            return  # the loop already closed it in shutdown_asyncgens()
        if self.in_loop_thread:
            self.loop.create_task(agen.aclose())
            return
        with contextlib.suppress(ClientClosedError):
            self.call(agen.aclose)


async def _shutdown(client: AsyncClient) -> None:
    """Close the pool, then cancel whatever is still running so no caller waits forever."""
    await client.aclose()
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _open(options: ClientOptions) -> AsyncClient:
    client = AsyncClient.from_options(options)
    await client.__aenter__()
    return client


async def _next_piece(agen: AsyncGenerator[T, None]) -> T | None:
    # StopAsyncIteration becomes None: it must not cross into concurrent.futures.
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None


class Client:
    """A blocking client for a Modal LLM web endpoint: ``AsyncClient`` behind plain calls.

    Usage::

        with Client("https://me--llm-web.modal.run", max_concurrency=16) as client:
            text = client.generate("Identify yourself, bot!", max_tokens=64)
            for piece in client.stream("Tell me a story"):
                print(piece, end="")
            texts = client.generate_many(prompts)   # concurrent, in input order

    Takes the same options as ``AsyncClient``. Safe to share between threads (one pool),
    usable inside a running event loop (Jupyter), and Ctrl-C cancels the waiting call.
    """

    _portal: _LoopThread | None = None  # so __repr__ and close() work if __init__ failed

    def __init__(self, endpoint_url: str | None = None, **options: Unpack[ClientSettings]) -> None:
        self._init(ClientOptions.build(endpoint_url, **options))

    @classmethod
    def from_options(cls, options: ClientOptions) -> Client:
        """Build a client from already resolved options (used by the LangChain adapter)."""
        self = cls.__new__(cls)
        self._init(options)
        return self

    def _init(self, options: ClientOptions) -> None:
        portal = _LoopThread()
        try:
            client = portal.call(_open, options)
        except BaseException:
            portal.closed = True
            portal.loop.call_soon_threadsafe(portal.loop.stop)
            raise
        self._portal = portal
        self._aclient = client
        self._options = options
        # Runs on close(), on garbage collection and at interpreter exit, whichever is first.
        self._finalizer = weakref.finalize(self, portal.stop, client)

    @property
    def options(self) -> ClientOptions:
        """The resolved settings (credentials are hidden in its repr)."""
        return self._options

    @property
    def endpoint_url(self) -> str:
        return self._options.endpoint_url

    @property
    def closed(self) -> bool:
        return self._portal is None or self._portal.closed

    def __repr__(self) -> str:
        if self._portal is None:
            return "<Client unopened>"
        state = "closed" if self.closed else "open"
        return f"<Client {redact_url(self._options.endpoint_url)} {state}>"

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Client:
        if self.closed:
            raise ClientClosedError(_CLOSED_MESSAGE)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the pool and stop the loop thread. Idempotent; calls in flight fail."""
        if self._portal is not None:
            self._finalizer()

    def _live_portal(self) -> _LoopThread:
        portal = self._portal
        if portal is None or portal.closed:
            raise ClientClosedError(_CLOSED_MESSAGE)
        return portal

    # -- calls -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> str:
        """Send ``prompt`` (with ``extra`` as model arguments) and return the generated text."""
        return self._live_portal().call(
            self._aclient.generate, prompt, stop=stop, headers=headers, timeout=timeout, **extra
        )

    def complete(
        self,
        prompt: str,
        *,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> Completion:
        """Like ``generate`` but return the whole reply: ``.text`` and ``.data`` (all keys)."""
        return self._live_portal().call(
            self._aclient.complete, prompt, headers=headers, timeout=timeout, **extra
        )

    def resume(
        self,
        result_url: str,
        *,
        max_redirects: int | None = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Completion:
        """Keep polling a Modal result URL (from ``ResultPendingError.result_url``), with a
        hop budget of its own (``max_redirects``, default the client's)."""
        return self._live_portal().call(
            self._aclient.resume, result_url, max_redirects=max_redirects, timeout=timeout
        )

    @overload
    def generate_many(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: Literal[False] = False,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> list[str]: ...

    @overload
    def generate_many(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: Literal[True],
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> list[str | ModalLLMError]: ...

    def generate_many(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: bool = False,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> list[str] | list[str | ModalLLMError]:
        """Generate for every prompt concurrently (under ``max_concurrency``), in input order."""
        # Materialize here: a generator must not be iterated from the loop thread.
        return self._live_portal().call(
            self._aclient.generate_many,  # type: ignore[arg-type]  # overloads vs ParamSpec
            list(prompts),
            return_exceptions=return_exceptions,
            stop=stop,
            headers=headers,
            timeout=timeout,
            **extra,
        )

    def stream(
        self,
        prompt: str,
        *,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> Generator[str, None, None]:
        """Yield the generated text piece by piece as the endpoint sends it.

        Leaving the loop early (``break``, an exception, Ctrl-C) or ``close()`` on the
        returned generator closes the HTTP response.
        """
        portal = self._live_portal()

        async def open_stream() -> AsyncGenerator[str, None]:
            return self._aclient.stream(
                prompt, stop=stop, headers=headers, timeout=timeout, **extra
            )

        return _pieces(portal, portal.call(open_stream))

    def map(
        self,
        items: Iterable[PromptLike],
        *,
        ordered: bool = False,
        concurrency: int | None = None,
        window: int | None = None,
        rate_limit: float | RateLimiter | None = None,
        adaptive: bool | AdaptiveConcurrency = False,
        progress: bool = False,
        on_progress: ProgressCallback | None = None,
        total: int | None = None,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> Generator[BatchResult, None, None]:
        """Blocking ``AsyncClient.map``: one ``BatchResult`` per item, pulled lazily.

        Same options and rules as ``AsyncClient.map`` (docs/batch.md); ``on_progress`` runs
        on the client's loop thread. Invalid options raise ``ConfigError`` here, at once.
        Leaving the loop early cancels what is in flight.
        """
        portal = self._live_portal()

        async def open_map() -> AsyncGenerator[BatchResult, None]:
            return self._aclient.map(
                items,
                ordered=ordered,
                concurrency=concurrency,
                window=window,
                rate_limit=rate_limit,
                adaptive=adaptive,
                progress=progress,
                on_progress=on_progress,
                total=total,
                stop=stop,
                headers=headers,
                timeout=timeout,
                **extra,
            )

        return _pieces(portal, portal.call(open_map))


def _pieces(portal: _LoopThread, agen: AsyncGenerator[T, None]) -> Generator[T, None, None]:
    try:
        while True:
            piece = portal.call(_next_piece, agen)
            if piece is None:
                return
            yield piece
    finally:
        portal.close_stream(agen)
