"""The blocking portal under ``Client``: one daemon thread running one event loop.

``LoopThread.call`` ships a coroutine function to the loop and blocks the calling thread
until it settles (starlette's ``TestClient`` idea turned around). Thread hand-offs are
batched both ways, since waking a thread is the costly part of a blocking call: see
``LoopThread._start_queued`` and ``_FdWaiter``. Each call runs in a task of its own,
created in a copy of its caller's context variables. Strictly private; ``Client``
(``_sync.py``) is its one user.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import select
import selectors
import sys
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._exceptions import ClientClosedError

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    from ._client import AsyncClient

    P = ParamSpec("P")

__all__ = ["CANCEL_GRACE", "CLOSED_MESSAGE", "CLOSE_TIMEOUT", "FORKED_MESSAGE", "LoopThread"]

T = TypeVar("T")

CANCEL_GRACE: Final = 5.0
"""Seconds a Ctrl-C waits for the cancelled call to unwind (release its connection)."""
CLOSE_TIMEOUT: Final = 10.0
"""Seconds ``close()`` (or exit) waits for the pool to close and the loop thread to end."""
# Windows cannot interrupt a lock wait with Ctrl-C, so the wait is sliced there.
_WAIT_SLICE: Final = 0.25 if sys.platform == "win32" else None
CLOSED_MESSAGE: Final = "Cannot use a closed client; create a new one."
FORKED_MESSAGE: Final = (
    "This call or stream was started before os.fork(), in the parent process; "
    "start it again in this process (the client itself works here)"
)


_LIVE_FDS: list[None] = []  # one item per open _FdWaiter in the process (_fd_waiter_budget)
_FDS_LOCK = threading.Lock()  # checking the budget and taking a slot, as one step


class _FdWaiter:
    """An eventfd a blocked caller sleeps on (Linux); pooled, so later calls reuse it.

    Why not a lock: releasing a lock wakes its waiter while the loop holds the GIL, so the
    woken thread preempts the loop, finds the GIL taken and sleeps again: two wasted
    thread switches per call. ``os.eventfd_write`` releases the GIL around the write, so
    the woken caller runs at once (2 thread switches per call instead of about 4).

    A caller takes a spare one from its portal and gives it back once its call returned.
    After a Ctrl-C it is not given back (the cancelled call may still wake it): dropping it
    closes the fd. A wake-up that comes late ends no later wait: callers re-check
    ``_Job.finished``. The fd is made before the object (``_new_fd_waiter``), so a failed
    ``os.eventfd`` leaves nothing half-built behind.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    # os.eventfd_read/_write do not retry EINTR (PEP 475): both retry here once signal
    # handlers ran and returned (a handler that raises, e.g. KeyboardInterrupt, propagates).

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
        self, _close: Callable[[int], None] = os.close, _live: list[None] = _LIVE_FDS
    ) -> None:
        """Close the eventfd, once; only when no job will wake it (no write to a reused fd)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)
            _live.pop()  # atomic: no lock here (a finalizer may run under any lock)

    __del__ = close  # dropped without close(): after a Ctrl-C


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


_Waiter = _FdWaiter | _LockWaiter


_READ_SIZE: Final = 64 * 1024
"""Bytes a plain-TCP socket read asks for on the portal's loop (asyncio's default: 256 KiB)."""


class _PortalLoop(asyncio.SelectorEventLoop):
    """The default selector loop, reading plain-TCP sockets ``_READ_SIZE`` bytes at a time.

    asyncio allocates each read's full size, then shrinks it to what arrived. On the loop's
    own thread glibc serves 256 KiB from ``mmap`` (above its 128 KiB threshold, outside
    the main arena): an ``mmap``, ``mremap`` and ``munmap`` per response, about a tenth of
    a small call's CPU. 64 KiB comes from the thread's heap. (TLS reads into a buffer of
    its own: unchanged.)
    """

    def __init__(self) -> None:
        self.fds = selectors.DefaultSelector()  # kept: disown() needs what it watches
        super().__init__(self.fds)

    def disown(self) -> None:
        """In a child made by ``os.fork()``: point the fds shared with the parent at /dev/null.

        The selector (epoll) and the sockets it watches are the parent's too. Closing the
        child's copies would be harmless, but an unregister (``epoll_ctl``, from a transport
        closed by the GC) would silence the parent's sockets, and a TLS close would send a
        close_notify on the parent's connection. ``dup2`` replaces each fd in place, so
        whatever still holds its number (and closes it one day) holds a private stand-in.
        """
        watched = self.fds.get_map()
        fds = set() if watched is None else {key.fd for key in watched.values()}
        fileno = getattr(self.fds, "fileno", None)  # epoll, kqueue, devpoll
        if fileno is not None and watched is not None:
            fds.add(fileno())
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)

    async def create_connection(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        transport, protocol = await super().create_connection(*args, **kwargs)
        if hasattr(transport, "max_size"):  # the selector transport's read size
            transport.max_size = _READ_SIZE
        return transport, protocol


_PORTALS: weakref.WeakSet[LoopThread] = weakref.WeakSet()  # every portal of the process
_FORSAKEN: list[object] = []  # a forked child's portals of its parent, never collected


def _after_fork_in_child() -> None:
    """In a child made by ``os.fork()``: leave every portal of the parent behind.

    Their loop threads did not survive the fork, and their loops' fds are shared with the
    parent. Each is marked ``forked`` (``Client`` opens a fresh portal and pool on first
    use), its loop disowns the shared fds, and it is kept alive here so that no finalizer
    of its loop, pool or connections ever runs in the child.
    """
    global _FDS_LOCK
    _FDS_LOCK = threading.Lock()  # a parent's thread may have held it at the fork
    for portal in list(_PORTALS):
        portal.forsake()
        _FORSAKEN.append(portal)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _new_loop() -> asyncio.AbstractEventLoop:
    """The policy's new loop; a ``_PortalLoop`` instead of the plain selector loop."""
    loop = asyncio.new_event_loop()
    if type(loop) is not asyncio.SelectorEventLoop:  # uvloop, Windows' proactor...
        return loop
    loop.close()
    return _PortalLoop()


_MAX_FD_WAITERS: Final = 256
_MAX_SPARE: Final = 32  # idle eventfds a portal keeps; one returned past this closes


def _fd_waiter_budget() -> int:
    """How many eventfds all portals of the process may hold together.

    An eighth of the file descriptor limit, at most 256: the rest stays for connections
    and files, and a few Clients shared by many threads cannot fill the fd table. None
    where ``os.eventfd`` is missing. Past the budget, callers wait on locks.
    """
    if not hasattr(os, "eventfd"):
        return 0
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_FD_WAITERS
    return min(soft // 8, _MAX_FD_WAITERS)


def _new_fd_waiter() -> _FdWaiter | None:
    """An ``_FdWaiter`` on a fresh eventfd, if the process-wide budget and the fd table
    allow one more; else None."""
    budget = _fd_waiter_budget()
    with _FDS_LOCK:
        if len(_LIVE_FDS) >= budget:
            return None
        try:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
        except OSError:  # out of file descriptors after all
            return None
        _LIVE_FDS.append(None)
    return _FdWaiter(fd)


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
        self.task: asyncio.Task[None] | None = None  # set by the task once it runs
        self.waiter = waiter
        self.finished = False  # set once, by finish(), when the outcome is known
        self.cancelled = False  # Ctrl-C in the caller
        # The caller's context variables (its OpenTelemetry span...), copied: the call's
        # task runs in this copy, so what the call sets stays in the call.
        self.context = contextvars.copy_context()

    def finish(self) -> None:
        self.fn = self.args = self.kwargs = None  # type: ignore[assignment]
        self.finished = True
        self.waiter.wake()

    def cancel(self) -> None:
        """On the loop: Ctrl-C in the caller.

        A call whose task has not run yet is only marked (a task cancelled before its first
        step never runs its body, so it would never settle); ``_run_job`` sees the mark.
        """
        self.cancelled = True
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
        self.forked = False  # this process is a fork of the one whose portal this was
        self.left_behind: list[object] = []  # what a forked child must never finalize
        self.reopening = threading.Lock()  # one Client reopens per fork (_sync.py)
        # Held while submitting and while closing, so no call is queued behind loop.stop().
        self._submit = threading.Lock()
        self._submitting = 0  # the caller thread inside call()'s ``with self._submit``, or 0
        self._queue: list[_Job] = []  # calls submitted, not yet started on the loop
        self._wake_scheduled = False  # a _start_queued is on its way to the loop
        self._finished: list[_Job] = []  # settled on the loop, callers not yet woken
        # Calls whose task exists and has not settled: a task cancelled before its first
        # step (shutdown cancels every task) never runs its body, so the loop thread's exit
        # settles what is left here; no caller waits for a task that will never report.
        self._running: set[_Job] = set()
        self._spare: list[_FdWaiter] = []  # eventfds of calls that have returned
        self._fd_waiters = 0  # eventfds this portal made (under _submit)
        self._thread = threading.Thread(target=self._run, name="modal-llm-loop", daemon=True)
        self._thread.start()
        _PORTALS.add(self)

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
                stranded = [job for job in self._running if not job.finished]
                self._running.clear()
                for job in queued + stranded:  # never started, or cancelled before it ran
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
                raise ClientClosedError(FORKED_MESSAGE if self.forked else CLOSED_MESSAGE)
            # Any allocation here may run the cyclic GC, and with it an abandoned stream's
            # finalizer (close_stream) on this very thread: it must not wait for the lock.
            self._submitting = threading.get_ident()
            try:
                waiter = self._spare.pop() if self._spare else self._new_waiter()
                job = _Job(fn, args, kwargs, waiter)
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
        if isinstance(waiter, _FdWaiter):  # not after a Ctrl-C: a late wake-up may come
            self._keep_spare(waiter)
        error = job.error
        if error is None:
            return job.result  # type: ignore[no-any-return]
        if isinstance(error, asyncio.CancelledError):
            # Only close() cancels tasks behind a caller's back.
            raise ClientClosedError("the client was closed while this call was running") from None
        job.error = None  # no reference cycle through the traceback
        raise error

    def forsake(self) -> None:
        """In a forked child: this portal is the parent's (see ``_after_fork_in_child``)."""
        self._submit = threading.Lock()  # a parent's thread may have held it at the fork
        self.reopening = threading.Lock()
        if self.closed:
            return  # closed before the fork: stays closed
        self.closed = self.forked = True
        if isinstance(self.loop, _PortalLoop):
            self.loop.disown()
        self._close_spares()  # the child's copies of the eventfds

    def _keep_spare(self, waiter: _FdWaiter) -> None:
        """Keep a returned call's eventfd for the next call, any thread's.

        Closed at once instead when the portal keeps ``_MAX_SPARE`` idle ones already (a
        burst of callers leaves no pile of idle fds) or has closed.
        """
        if len(self._spare) >= _MAX_SPARE:
            waiter.close()  # its call settled: nothing writes to it any more
            return
        self._spare.append(waiter)
        if self.closed:  # stop() may have closed the spares already: close this one too
            self._close_spares()

    def _close_spares(self) -> None:
        """Close the idle eventfds now, not whenever their objects happen to be freed."""
        with self._submit:
            spares, self._spare = self._spare, []
        for waiter in spares:
            waiter.close()

    def _new_waiter(self) -> _Waiter:
        """Under ``_submit``: an eventfd for one more caller, or a lock past the budget."""
        waiter = _new_fd_waiter()
        if waiter is None:
            return _LockWaiter()
        self._fd_waiters += 1
        return waiter

    # Hand-offs are batched both ways: callers queue their calls and only the first of a
    # batch wakes the loop (call_soon_threadsafe writes to the loop's self-pipe); finished
    # calls wake their callers once per loop iteration, after the loop has done the work
    # that was ready. Waking a blocked thread while holding the GIL is the costly part of
    # a hand-off, and this keeps it off the loop's critical path.

    def _start_queued(self) -> None:
        """On the loop: start a task for every queued call (one wake-up per batch)."""
        with self._submit:
            self._wake_scheduled = False
            jobs = list(self._queue)
            self._queue.clear()
            closing = self.closed
        for job in jobs:
            if closing:
                job.error = asyncio.CancelledError()
                job.finish()
            else:
                self._own_task(job)

    def _own_task(self, job: _Job) -> asyncio.Task[None]:
        """A task for ``job`` alone, created in the copy of its caller's context."""
        self._running.add(job)
        return job.context.run(self.loop.create_task, self._run_job(job))

    async def _run_job(self, job: _Job) -> None:
        """A call's task: run it, keep its outcome, queue its caller's wake-up."""
        try:
            if job.cancelled:  # Ctrl-C before its task first ran
                raise asyncio.CancelledError
            job.task = asyncio.current_task()
            job.result = await job.fn(*job.args, **job.kwargs)
        except BaseException as exc:
            job.error = exc
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._running.discard(job)
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
        """Close an abandoned stream's async generator (and so its HTTP response).

        From a GC that ran inside this thread's own ``call()`` (under ``_submit``), the
        close is scheduled on the loop without waiting: waiting would need that lock.
        """
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


async def _shutdown(client: AsyncClient) -> None:
    """Close the pool, then cancel whatever is still running so no caller waits forever."""
    await client.aclose()
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
