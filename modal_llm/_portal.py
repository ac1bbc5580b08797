"""The blocking portal under ``Client``: one daemon thread running one event loop.

``LoopThread.call`` ships a coroutine function to the loop and blocks the calling thread
until it settles (starlette's ``TestClient`` idea turned around). Thread hand-offs are
batched both ways, since waking a thread is the costly part of a blocking call: see
``LoopThread._start_queued``. Strictly private; ``Client`` (``_sync.py``) is its one user.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._exceptions import ClientClosedError

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    from ._client import AsyncClient

    P = ParamSpec("P")

__all__ = ["CANCEL_GRACE", "CLOSED_MESSAGE", "CLOSE_TIMEOUT", "LoopThread"]

T = TypeVar("T")

CANCEL_GRACE: Final = 5.0
"""Seconds a Ctrl-C waits for the cancelled call to unwind (release its connection)."""
CLOSE_TIMEOUT: Final = 10.0
"""Seconds ``close()`` (or exit) waits for the pool to close and the loop thread to end."""
# Windows cannot interrupt a lock wait with Ctrl-C, so the wait is sliced there.
_WAIT_SLICE: Final = 0.25 if sys.platform == "win32" else None
CLOSED_MESSAGE: Final = "Cannot use a closed client; create a new one."


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


class LoopThread:
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
                raise ClientClosedError(CLOSED_MESSAGE)
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
