"""The blocking portal under ``Client``: one daemon thread running one event loop.

``LoopThread.call`` ships a coroutine function to the loop and blocks the calling thread
until it settles (starlette's ``TestClient`` idea turned around). Thread hand-offs are
batched both ways, since waking a thread is the costly part of a blocking call: see
``LoopThread._start_queued`` and ``_Lane``. Strictly private; ``Client``
(``_sync.py``) is its one user.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import select
import sys
import threading
import time
import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
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


_LIVE_LANES: list[None] = []  # one item per open lane in the process (_fd_waiter_budget)
_LANES_LOCK = threading.Lock()  # checking the budget and taking a slot, as one step


class _Lane:
    """Where a call runs and waits (Linux): an eventfd, and a task that runs calls in turn.

    Pooled: a call takes a spare one and gives it back. The caller sleeps on the eventfd,
    not a lock (a lock's release wakes it while the loop holds the GIL: two wasted thread
    switches); ``os.eventfd_write`` releases the GIL, so the woken caller usually hands
    the lane its next call before the lane's task looks: it starts in the same task step
    (no task, no loop wake-up, no burst of allocations setting off the cyclic GC). A late
    wake-up (after a Ctrl-C) ends no later wait: callers re-check ``_Job.finished``.
    """

    __slots__ = ("fd", "job", "parked", "retired", "task", "wakeup")

    def __init__(self, fd: int) -> None:
        self.fd = fd  # made by the caller: a failed os.eventfd leaves no half-built lane
        # Under LoopThread._submit: the next call, and the task's state.
        self.job: _Job | None = None
        self.task: asyncio.Task[None] | None = None  # None: not started, or ended
        self.parked = False  # the task awaits ``wakeup`` for a call
        self.retired = False  # abandoned after a Ctrl-C: the task ends once idle
        self.wakeup: asyncio.Future[None] | None = None

    def take(self, job: _Job) -> bool:
        """Under ``_submit``: hand the lane ``job``; whether the loop must (re)start it."""
        if not _LANES:  # Python 3.10: each call runs in a task of its own
            return True
        self.job = job
        if self.parked or self.task is None:
            self.parked = False
            return True
        return False  # its task is between calls and looks for this one next

    def retire(self) -> None:
        """On the loop: no more calls; its task (if any) ends once idle, then the fd closes."""
        self.retired = True
        wakeup = self.wakeup
        if self.parked and wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    # os.eventfd_read/_write do not retry EINTR (PEP 475): both retry here, once handlers
    # ran and returned (one that raises, e.g. KeyboardInterrupt, propagates instead).
    def wake(self) -> None:
        while True:
            with contextlib.suppress(InterruptedError):
                os.eventfd_write(self.fd, 1)
                return

    def wait(self, timeout: float | None = None) -> None:
        if timeout is not None:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            if not poller.poll(max(0, int(timeout * 1000))):  # poll retries EINTR itself
                return
        while True:
            with contextlib.suppress(InterruptedError):
                os.eventfd_read(self.fd)  # resets the count: several wake-ups are one
                return

    def close(
        self, _close: Callable[[int], None] = os.close, _live: list[None] = _LIVE_LANES
    ) -> None:
        """Close the eventfd, once; only when no job will wake it (no write to a reused fd)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)
            _live.pop()  # atomic: no lock here (a finalizer may run under any lock)

    __del__ = close  # a lane dropped without close(): after a Ctrl-C


class _LockWaiter:
    """One call's wake-up where there is no eventfd (or no budget for one more)."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()  # released once, by wake()

    def wake(self) -> None:
        self.lock.release()

    def wait(self, timeout: float | None = None) -> None:
        if timeout is not None:
            self.lock.acquire(timeout=timeout)
        elif _WAIT_SLICE is None:
            self.lock.acquire()
        else:
            while not self.lock.acquire(timeout=_WAIT_SLICE):
                pass


_Waiter = _Lane | _LockWaiter
_LANES: Final = sys.version_info >= (3, 11)  # Task.cancelling(): a lane sees a stray cancel


_READ_SIZE: Final = 64 * 1024
"""Bytes a plain-TCP socket read asks for on the portal's loop (asyncio's default: 256 KiB)."""


class _PortalLoop(asyncio.SelectorEventLoop):
    """The default selector loop, reading plain-TCP sockets ``_READ_SIZE`` bytes at a time:
    asyncio allocates each read's full size, and glibc serves 256 KiB off the main thread
    from ``mmap`` (an ``mmap``, ``mremap``, ``munmap`` per response); 64 KiB, from the heap."""

    async def create_connection(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        transport, protocol = await super().create_connection(*args, **kwargs)
        if hasattr(transport, "max_size"):  # the selector transport's read size
            transport.max_size = _READ_SIZE
        return transport, protocol


def _new_loop() -> asyncio.AbstractEventLoop:
    """The policy's new loop; a ``_PortalLoop`` instead of the plain selector loop."""
    loop = asyncio.new_event_loop()
    if type(loop) is not asyncio.SelectorEventLoop:  # uvloop, Windows' proactor...
        return loop
    loop.close()
    return _PortalLoop()


_MAX_FD_WAITERS: Final = 256
_MAX_SPARE: Final = 32  # idle lanes a portal keeps; one returned past this retires


def _fd_waiter_budget() -> int:
    """How many eventfds all portals of the process may hold together: an eighth of the
    file descriptor limit, at most 256 (the rest stays for connections and files); none
    where ``os.eventfd`` is missing. Past it, callers wait on locks."""
    if not hasattr(os, "eventfd"):
        return 0
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_FD_WAITERS
    return min(soft // 8, _MAX_FD_WAITERS)


def _new_lane() -> _Lane | None:
    """A lane with a fresh eventfd, if the process-wide budget and the fd table allow one."""
    budget = _fd_waiter_budget()
    with _LANES_LOCK:
        if len(_LIVE_LANES) >= budget:
            return None
        try:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
        except OSError:  # out of file descriptors after all
            return None
        _LIVE_LANES.append(None)
    return _Lane(fd)


def _wait_for_result(job: _Job) -> None:
    """Block until the loop has settled ``job``; the one place a Ctrl-C reaches a caller."""
    waiter = job.waiter
    while not job.finished:
        waiter.wait()


class _Job:
    """One blocking call on its way through the loop: what to run, and its outcome."""

    __slots__ = (
        "args",
        "cancelled",
        "context",
        "error",
        "finished",
        "fn",
        "kwargs",
        "result",
        "task",
        "waiter",
    )

    def __init__(
        self, fn: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, waiter: _Waiter
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.result: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None  # its own, or its lane's once started
        self.waiter = waiter
        self.finished = False  # set once, by finish(), when the outcome is known
        self.cancelled = False  # Ctrl-C in the caller
        # The caller's context variables (its OpenTelemetry span...): the call runs in them.
        self.context = contextvars.copy_context()

    def finish(self) -> None:
        self.fn = self.args = self.kwargs = None  # type: ignore[assignment]
        self.finished = True
        self.waiter.wake()

    def cancel(self) -> None:
        """On the loop: Ctrl-C in the caller. A lane's call not started yet never starts."""
        self.cancelled = True
        if isinstance(self.waiter, _Lane):
            self.waiter.retire()  # so its task ends
        if self.task is not None and not self.finished:
            self.task.cancel()

    def wait_unwound(self, timeout: float) -> None:
        """After a Ctrl-C: give the cancelled call up to ``timeout`` seconds to settle."""
        deadline = time.monotonic() + timeout
        while not self.finished:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.waiter.wait(left)


class LoopThread:
    """A daemon thread running one event loop; ``call`` runs a coroutine there and blocks.

    Strictly private. The coroutine is *created* in the loop thread too, so async
    generators register their finalizers with this loop, not with the caller's.
    """

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.closed = False
        # Held while submitting and while closing, so no call is queued behind loop.stop().
        self._submit = threading.Lock()
        self._submitting = 0  # the caller thread inside call()'s ``with self._submit``, or 0
        self._queue: list[_Job] = []  # calls submitted, not yet started on the loop
        self._wake_scheduled = False  # a _start_queued is on its way to the loop
        self._finished: list[_Job] = []  # settled on the loop, callers not yet woken
        self._spare: list[_Lane] = []  # lanes of calls that have returned
        self._fd_waiters = 0  # lanes this portal made (under _submit)
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
                self._close_spares()  # those still in use: once their callers return them

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
        with self._submit:
            if self.closed:
                raise ClientClosedError(CLOSED_MESSAGE)
            # Any allocation here may run the cyclic GC, and with it an abandoned stream's
            # finalizer (close_stream) on this very thread: it must not wait for the lock.
            self._submitting = threading.get_ident()
            try:
                waiter = self._spare.pop() if self._spare else self._new_waiter()
                job = _Job(fn, args, kwargs, waiter)
                if not isinstance(waiter, _Lane) or waiter.take(job):
                    self._queue.append(job)
                    if not self._wake_scheduled:
                        self._wake_scheduled = True
                        self.loop.call_soon_threadsafe(self._start_queued)
            finally:
                self._submitting = 0
        try:
            _wait_for_result(job)
        except KeyboardInterrupt:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self.loop.call_soon_threadsafe(job.cancel)
            job.wait_unwound(CANCEL_GRACE)
            raise
        if isinstance(waiter, _Lane):  # not after a Ctrl-C: a late wake-up may come
            self._keep_spare(waiter)
        error = job.error
        if error is None:
            return job.result  # type: ignore[no-any-return]
        if isinstance(error, asyncio.CancelledError):
            # Only close() cancels tasks behind a caller's back.
            raise ClientClosedError("the client was closed while this call was running") from None
        job.error = None  # no reference cycle through the traceback
        raise error

    def _keep_spare(self, waiter: _Lane) -> None:
        """Keep a returned call's lane for the next call, unless the portal has closed or
        keeps ``_MAX_SPARE`` idle ones already (then the lane retires and its fd closes)."""
        if len(self._spare) >= _MAX_SPARE:
            waiter.close()  # its call settled: nothing writes to it any more
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing runs it
                self.loop.call_soon_threadsafe(waiter.retire)
            return
        self._spare.append(waiter)
        if self.closed:  # stop() may have closed the spares already: close this one too
            self._close_spares()

    def _close_spares(self) -> None:
        """Close the idle lanes' eventfds now: a lane and its task's frame refer to each
        other, so dropping them would leave the fds to a later cyclic GC."""
        with self._submit:
            spares, self._spare = self._spare, []
        for lane in spares:
            lane.close()

    def _new_waiter(self) -> _Waiter:
        """Under ``_submit``: a lane for one more caller, or a lock past the budget."""
        lane = _new_lane()
        if lane is None:
            return _LockWaiter()
        self._fd_waiters += 1
        return lane

    # Hand-offs are batched: only the first call of a batch wakes the loop (its self-pipe);
    # finished calls wake their callers once per loop iteration, off the critical path.

    def _start_queued(self) -> None:
        """On the loop: start or wake what runs each queued call (one wake-up per batch)."""
        with self._submit:
            self._wake_scheduled = False
            jobs = list(self._queue)
            self._queue.clear()
            closing = self.closed
        loop = self.loop
        for job in jobs:
            lane = job.waiter
            if closing:
                job.error = asyncio.CancelledError()
                job.finish()
            elif not isinstance(lane, _Lane) or not _LANES:
                job.task = self._own_task(job)
            elif lane.task is None:  # it runs each call in the call's context, see _run_in
                lane.task = contextvars.Context().run(loop.create_task, self._run_lane(lane))
            elif lane.wakeup is not None and not lane.wakeup.done():
                lane.wakeup.set_result(None)  # it was parked

    async def _run_lane(self, lane: _Lane) -> None:
        """A lane's task: run each call handed to it, waking its caller as it settles."""
        task = lane.task
        assert task is not None
        try:
            while True:
                with self._submit:
                    job = lane.job
                    lane.job = None
                    if job is None:
                        if lane.retired:
                            return
                        lane.parked = True
                        wakeup = lane.wakeup = self.loop.create_future()
                if job is None:
                    await wakeup
                    continue
                if sys.version_info >= (3, 11) and task.cancelling():
                    # A cancel meant for an earlier call is pending: this one gets a task.
                    job.task = self._own_task(job)
                    return
                if job.cancelled:  # Ctrl-C before it started
                    job.error = asyncio.CancelledError()
                    job.finish()
                    continue
                job.task = task
                try:
                    job.result = await self._run_in(job)
                except Exception as exc:
                    job.error = exc
                except BaseException as exc:  # cancelled (Ctrl-C, close()), or exiting
                    job.error = exc
                    job.finish()
                    raise
                job.finish()
        finally:
            with self._submit:
                lane.task = None
                lane.parked = False
                job = lane.job  # handed over as the task ended
                lane.job = None
                closing = self.closed
            if job is not None:
                if closing:
                    job.error = asyncio.CancelledError()
                    job.finish()
                else:
                    job.task = self._own_task(job)

    @staticmethod
    def _run_in(job: _Job) -> Awaitable[Any]:
        """In a lane: ``await job.fn(...)`` in the caller's context variables (a copy of
        them, its own), as in a task of its own: what the call sets stays in the call."""
        context = job.context
        steps = context.run(lambda: job.fn(*job.args, **job.kwargs).__await__())
        return _stepped_in(context, steps)

    def _own_task(self, job: _Job) -> asyncio.Task[None]:
        """A task for ``job`` alone, in a copy of its caller's context."""
        return job.context.run(self.loop.create_task, self._run_job(job))

    async def _run_job(self, job: _Job) -> None:
        """A call's own task: without a lane (no eventfd), or after a lane's stray cancel."""
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
        self._close_spares()

    def close_stream(self, agen: AsyncGenerator[Any, None]) -> None:
        """Close an abandoned stream's async generator (and so its HTTP response)."""
        if self.closed:
            return  # the loop already closed it in shutdown_asyncgens()
        if self.in_loop_thread:
            self.loop.create_task(agen.aclose())
            return
        if self._submitting == threading.get_ident():  # finalized by a GC inside call()
            with contextlib.suppress(RuntimeError):  # the loop closed: shutdown closed it
                self.loop.call_soon_threadsafe(lambda: self.loop.create_task(agen.aclose()))
            return
        with contextlib.suppress(ClientClosedError):
            self.call(agen.aclose)


@types.coroutine
def _stepped_in(
    context: contextvars.Context, steps: Generator[Any, Any, T]
) -> Generator[Any, Any, T]:
    """Drive ``steps`` (an awaitable's iterator) with each step run in ``context``."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = (steps.send, value) if error is None else (steps.throw, error)
            yielded, error = context.run(*step), None
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        try:
            value = yield yielded
        except GeneratorExit:
            context.run(steps.close)
            raise
        except BaseException as exc:  # a cancel, thrown in by the task: into the call
            value, error = None, exc


async def _shutdown(client: AsyncClient) -> None:
    """Close the pool, then cancel whatever is still running so no caller waits forever."""
    await client.aclose()
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
