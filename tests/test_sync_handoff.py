"""How a blocking ``Client`` call waits for the loop thread: eventfds, their lock fallback.

On Linux a caller sleeps on an eventfd the portal keeps for later calls (woken without the
loop holding the GIL); past a budget, or where there is no eventfd, it sleeps on a lock.
Either way each thread gets its own outcome, Ctrl-C interrupts the wait, and closing the
client closes every eventfd. The loop reads plain TCP 64 KiB at a time, unless the event
loop policy makes its own loops. Over real HTTP on 127.0.0.1 (``ThreadedEndpoint``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import gc
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from modal_llm import Client, ClientClosedError, StatusError, _portal

from .endpoints import WAIT, ThreadedEndpoint

needs_eventfd = pytest.mark.skipif(
    not hasattr(os, "eventfd") or not Path("/proc/self/fd").is_dir(),
    reason="eventfd waiters are Linux-only",
)


@pytest.fixture
def endpoint() -> Iterator[ThreadedEndpoint]:
    server = ThreadedEndpoint()
    yield server
    server.close()


@pytest.fixture(params=["eventfd", "lock"])
def waiters(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with eventfd waiters (where there are any) and once with locks only."""
    if request.param == "lock":
        monkeypatch.setattr(_portal, "_fd_waiter_budget", lambda: 0)
    return str(request.param)


def eventfds(*, collect: bool = True) -> int:
    """The eventfds this process has open (after collecting what earlier tests dropped)."""
    if collect:
        gc.collect()
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listing itself, closed by now
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]"
    return count


def settle_in_batches(client: Client, endpoint: ThreadedEndpoint, threads: int) -> list[str]:
    """``2 * threads`` calls from ``threads`` threads, released together in gated batches."""
    endpoint.gate_at = threads
    prompts = [f"gate: {i}" if i % 3 else f"fail: {i}" for i in range(2 * threads)]

    def call(prompt: str) -> str:
        try:
            return client.generate(prompt)
        except StatusError as exc:
            return f"{prompt} -> {exc.status_code}"

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(call, prompts))
    assert results == [f"{p} :: {{}}" if i % 3 else f"{p} -> 422" for i, p in enumerate(prompts)]
    return results


def test_each_thread_gets_its_own_outcome(waiters: str, endpoint: ThreadedEndpoint) -> None:
    with Client(endpoint.url, max_concurrency=16) as client:
        settle_in_batches(client, endpoint, 16)
        portal = client._portal
        assert portal is not None
        made = portal._fd_waiters
    assert made == (0 if waiters == "lock" or not hasattr(os, "eventfd") else 16)


@needs_eventfd
def test_past_the_budget_calls_wait_on_locks(
    endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_portal, "_fd_waiter_budget", lambda: 3)
    with Client(endpoint.url, max_concurrency=12) as client:
        settle_in_batches(client, endpoint, 12)
        portal = client._portal
        assert portal is not None
        assert portal._fd_waiters == 3
        assert len(portal._spare) == 3  # reused by later calls, whichever thread makes them


@needs_eventfd
def test_closing_the_client_closes_its_eventfds(endpoint: ThreadedEndpoint) -> None:
    before = eventfds()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        client = Client(endpoint.url, max_concurrency=8)
        settle_in_batches(client, endpoint, 8)
        assert eventfds() == before + 8
        client.close()  # while the threads that made the calls are still alive
        assert eventfds() == before
        assert list(pool.map(lambda _: client.closed, range(8))) == [True] * 8


@needs_eventfd
def test_a_garbage_collected_client_closes_its_eventfds(endpoint: ThreadedEndpoint) -> None:
    before = eventfds()
    client = Client(endpoint.url, max_concurrency=4)
    settle_in_batches(client, endpoint, 4)
    del client
    gc.collect()
    assert eventfds() == before


def test_real_sigint_interrupts_the_wait(waiters: str, endpoint: ThreadedEndpoint) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT does not raise KeyboardInterrupt here")

    def press_ctrl_c() -> None:
        assert endpoint.received.wait(WAIT)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    with Client(endpoint.url, max_retries=0) as client:
        presser = threading.Thread(target=press_ctrl_c)
        presser.start()
        with pytest.raises(KeyboardInterrupt):
            client.generate("hold: forever")
        presser.join(WAIT)
        assert endpoint.disconnected.wait(WAIT)  # the call was cancelled on the loop
        assert client.generate("next") == "next :: {}"


def test_a_late_wake_up_after_ctrl_c_ends_no_later_call(
    waiters: str, endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No grace: the interrupted call settles after KeyboardInterrupt was raised, and its
    # wake-up arrives while later calls wait; each of them still gets its own result.
    monkeypatch.setattr(_portal, "CANCEL_GRACE", 0.0)
    real_wait = _portal._wait_for_result
    interrupted: list[bool] = []

    def wait_then_ctrl_c(job: object) -> None:
        if not interrupted:
            interrupted.append(True)
            assert endpoint.received.wait(WAIT)
            raise KeyboardInterrupt
        real_wait(job)  # type: ignore[arg-type]

    with Client(endpoint.url, max_retries=0) as client:
        monkeypatch.setattr(_portal, "_wait_for_result", wait_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            client.generate("hold: forever")
        assert [client.generate(f"after {i}") for i in range(20)] == [
            f"after {i} :: {{}}" for i in range(20)
        ]
        assert endpoint.disconnected.wait(WAIT)


def test_large_replies_arrive_whole_in_smaller_reads(endpoint: ThreadedEndpoint) -> None:
    with Client(endpoint.url) as client:
        portal = client._portal
        assert portal is not None
        if sys.platform != "win32":
            assert type(portal.loop) is _portal._PortalLoop
        prompt = "".join(f"{i:07d} " for i in range(50_000))  # 400 KB, back in many reads
        assert client.generate(prompt) == f"{prompt} :: {{}}"
        assert client.generate_many([prompt[:70_000], "small"]) == [
            f"{prompt[:70_000]} :: {{}}",
            "small :: {}",
        ]


def test_a_custom_event_loop_policy_still_makes_the_loop(endpoint: ThreadedEndpoint) -> None:
    class OwnLoop(asyncio.SelectorEventLoop):
        pass

    class OwnPolicy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return OwnLoop()

    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(OwnPolicy())
    try:
        with Client(endpoint.url) as client:
            assert type(client._portal.loop) is OwnLoop  # type: ignore[union-attr]
            assert client.generate("own loop") == "own loop :: {}"
    finally:
        asyncio.set_event_loop_policy(previous)


def test_ctrl_c_before_the_call_starts_keeps_the_client(
    waiters: str, endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_wait = _portal._wait_for_result
    pressed: list[bool] = []

    def ctrl_c_at_once(job: object) -> None:
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt  # the call may not have started on the loop yet
        real_wait(job)  # type: ignore[arg-type]

    before = eventfds() if Path("/proc/self/fd").is_dir() else 0
    with Client(endpoint.url, max_retries=0) as client:
        client.generate("warm")  # a spare eventfd now, reused by the next call
        monkeypatch.setattr(_portal, "_wait_for_result", ctrl_c_at_once)
        with pytest.raises(KeyboardInterrupt):
            client.generate("interrupted")
        assert [client.generate(f"then {i}") for i in range(3)] == [
            f"then {i} :: {{}}" for i in range(3)
        ]
    if Path("/proc/self/fd").is_dir():
        assert eventfds() == before  # the interrupted call's eventfd closed too


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def test_each_call_sees_its_callers_context_variables(
    waiters: str, endpoint: ThreadedEndpoint
) -> None:
    # The caller's values at the time of the call, whichever thread made it and whatever
    # ran before with the same eventfd.
    endpoint.gate_at = 8

    async def gated_read() -> tuple[str, str]:
        seen = REQUEST_ID.get()
        await client.generate("gate: hold the batch together")
        return seen, REQUEST_ID.get()

    def call(i: int) -> tuple[str, str]:
        REQUEST_ID.set(f"r{i}")
        return portal.call(gated_read)

    with Client(endpoint.url, max_concurrency=8) as blocking:
        client = blocking._aclient
        portal = blocking._live_portal()
        assert portal.call(_read_id) == "-"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for _ in range(2):
                assert list(pool.map(call, range(16))) == [(f"r{i}", f"r{i}") for i in range(16)]
        token = REQUEST_ID.set("main")
        try:
            assert portal.call(_read_id) == "main"
        finally:
            REQUEST_ID.reset(token)
        assert portal.call(_read_id) == "-"


async def _read_id() -> str:
    return REQUEST_ID.get()


@contextlib.contextmanager
def no_op_handler(signum: int) -> Iterator[threading.Event]:
    """A Python handler for ``signum`` that only records it ran (and returns normally)."""
    ran = threading.Event()
    previous = signal.signal(signum, lambda *_: ran.set())
    try:
        yield ran
    finally:
        signal.signal(signum, previous)


def test_a_handler_that_returns_does_not_end_the_main_threads_wait(
    waiters: str, endpoint: ThreadedEndpoint
) -> None:
    # SIGALRM/SIGCHLD/a SIGTERM flag... interrupt the wait's system call; the handler runs
    # and returns, and the wait must go on (os.eventfd_read does not retry by itself).
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Python runs signal handlers in the main thread only")

    def signal_then_release() -> None:
        assert endpoint.received.wait(WAIT)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
        assert ran.wait(WAIT)  # set by the handler, while the main thread waits
        endpoint.release()

    with no_op_handler(signal.SIGUSR1) as ran, Client(endpoint.url, max_retries=0) as client:
        sender = threading.Thread(target=signal_then_release)
        sender.start()
        try:
            assert client.generate("hold: through a signal") == "hold: through a signal :: {}"
        finally:
            endpoint.release()
            sender.join(WAIT)
        assert ran.is_set()
        assert client.generate("next") == "next :: {}"


def test_a_signal_in_a_waiting_worker_thread_does_not_end_its_wait(
    waiters: str, endpoint: ThreadedEndpoint
) -> None:
    # A signal delivered to a non-main thread interrupts its system call, but its handler
    # runs later in the main thread: there, every EINTR would surface as InterruptedError.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the handler must be installed from the main thread")
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(client.generate("hold: in a worker"))
        except BaseException as exc:  # recorded for the assert below
            outcome.append(exc)

    with no_op_handler(signal.SIGUSR1) as ran, Client(endpoint.url, max_retries=0) as client:
        worker = threading.Thread(target=call)
        worker.start()
        try:
            assert endpoint.received.wait(WAIT)
            signal.pthread_kill(worker.ident or 0, signal.SIGUSR1)
            # The handler runs here once the worker took the signal (the main thread only
            # notices it between bytecodes, so it keeps executing some).
            for _ in range(10_000_000):
                if ran.is_set() or outcome:
                    break
            assert ran.is_set()
        finally:
            endpoint.release()
            worker.join(WAIT)
    assert outcome == ["hold: in a worker :: {}"]


@needs_eventfd
def test_eventfds_are_budgeted_across_all_clients_of_the_process(
    endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One budget for the process, not one per Client: a few Clients shared by many threads
    # must not hold the fd table (each would have kept its own share until closed).
    monkeypatch.setattr(_portal, "_fd_waiter_budget", lambda: 6)
    before = eventfds()
    clients = [Client(endpoint.url, max_concurrency=8) for _ in range(3)]
    try:
        for client in clients:
            settle_in_batches(client, endpoint, 8)
            assert eventfds() - before <= 6
        made = [client._portal._fd_waiters for client in clients]  # type: ignore[union-attr]
        assert sum(made) <= 6
    finally:
        for client in clients:
            client.close()
    assert eventfds() == before


@needs_eventfd
def test_a_client_keeps_few_idle_eventfds(
    endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_portal, "_MAX_SPARE", 2)
    before = eventfds()
    with Client(endpoint.url, max_concurrency=8) as client:
        # 8 calls all in flight together (the gate opens at 8): none can reuse the eventfd
        # of one that returned, so 8 eventfds (one of them the open's); then 6 close.
        # (settle_in_batches' failing calls return early: how many eventfds a thread's
        # next call finds idle depends on timing.)
        endpoint.gate_at = 8
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(client.generate, [f"gate: {i}" for i in range(8)]))
        assert texts == [f"gate: {i} :: {{}}" for i in range(8)]
        portal = client._portal
        assert portal is not None
        assert portal._fd_waiters == 8
        assert len(portal._spare) == 2
        assert client.generate("after") == "after :: {}"
        assert eventfds() == before + 2
    assert eventfds() == before


def test_no_eventfd_left_half_made_when_creating_one_fails(
    endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EMFILE from os.eventfd: the call waits on a lock, and nothing half-built is left
    # whose finalizer fails (an unraisable exception: an error under pytest here).
    def out_of_fds(*_: object) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "eventfd", out_of_fds, raising=False)
    with Client(endpoint.url, max_concurrency=4) as client:
        settle_in_batches(client, endpoint, 4)
        assert client._portal._fd_waiters == 0  # type: ignore[union-attr]
        assert client.generate("still") == "still :: {}"
    gc.collect()


class _Holder:
    stream: object
    itself: object


def test_a_stream_collected_while_a_call_is_submitted_does_not_hang_it(
    endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An abandoned stream in a reference cycle is closed by its finalizer whenever the
    # cyclic GC runs: here inside call(), while that thread submits its own call.
    client = Client(endpoint.url, max_retries=0)
    holder = _Holder()
    holder.itself = holder
    holder.stream = client.stream("hold: abandoned")
    assert next(holder.stream)  # type: ignore[call-overload]
    # Kept out of the cycle: only the blocking generator is finalized, not the async stream
    # under it (which, collected while open, would warn about the leak on its own).
    pieces = holder.stream.gi_frame.f_locals["agen"]  # type: ignore[attr-defined]
    del holder
    real_job = _portal._Job
    collected: list[int] = []

    def collecting_job(*args: object) -> object:
        if not collected:
            collected.append(gc.collect())  # finalizes the stream, on this thread
        return real_job(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_portal, "_Job", collecting_job)
    outcome: list[str] = []
    caller = threading.Thread(target=lambda: outcome.append(client.generate("next")), daemon=True)
    caller.start()
    caller.join(WAIT)
    assert not caller.is_alive(), "the call deadlocked"  # left open: close() would hang too
    assert outcome == ["next :: {}"]
    assert collected and collected[0] > 0
    assert endpoint.disconnected.wait(WAIT)  # the abandoned stream's response was closed
    client.close()
    assert "not open" in repr(pieces)


@needs_eventfd
def test_close_closes_the_eventfds_without_waiting_for_the_gc(endpoint: ThreadedEndpoint) -> None:
    # close() closes the idle eventfds itself: none is left to whenever the cyclic GC
    # next frees an object that still holds one.
    before = eventfds()
    gc.disable()
    try:
        client = Client(endpoint.url, max_concurrency=8)
        settle_in_batches(client, endpoint, 8)
        client.close()
        open_now = eventfds(collect=False)
    finally:
        gc.enable()
    assert open_now == before


SET_IN_A_CALL: contextvars.ContextVar[str] = contextvars.ContextVar("set_in_a_call", default="-")


def test_what_a_call_sets_in_its_context_stays_in_that_call(
    waiters: str, endpoint: ThreadedEndpoint
) -> None:
    # Each call runs in a task of its own: a hook (or tracing library...) that sets a
    # context variable during a call leaves no trace in the next call, of any thread.
    seen: list[str] = []

    def hook(event: object) -> None:
        seen.append(SET_IN_A_CALL.get())
        SET_IN_A_CALL.set(f"set during call {len(seen)}")

    def calls(n: int) -> None:
        for i in range(n):
            assert client.generate(f"call {i}") == f"call {i} :: {{}}"

    with Client(endpoint.url, max_retries=0, event_hooks={"attempt": [hook]}) as client:
        calls(3)
        for _ in range(2):
            other = threading.Thread(target=calls, args=(3,))
            other.start()
            other.join(WAIT)
        calls(2)
    assert seen == ["-"] * 11
    assert SET_IN_A_CALL.get() == "-"


def test_a_call_whose_task_is_cancelled_before_it_runs_does_not_hang_its_caller(
    waiters: str, endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shutdown cancels every task on the loop; a task cancelled before its first step never
    # runs its body (so never reports). Here the cancel comes at once, on purpose: the
    # caller must still get ClientClosedError when the client closes, not wait forever.
    real_own_task = _portal.LoopThread._own_task
    started = threading.Event()

    def cancelled_at_once(self: _portal.LoopThread, job: _portal._Job) -> asyncio.Task[None]:
        task = real_own_task(self, job)
        task.cancel()
        started.set()
        return task

    client = Client(endpoint.url, max_retries=0)  # its set-up is a call too: before the patch
    monkeypatch.setattr(_portal.LoopThread, "_own_task", cancelled_at_once)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.generate("never runs")
        except BaseException as exc:  # the test reports whatever it was
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    assert started.wait(WAIT)
    client.close()
    caller.join(WAIT)
    assert not caller.is_alive(), "the caller waits for a task that never ran"
    assert [type(exc) for exc in outcome] == [ClientClosedError]
    assert endpoint.bodies == []  # the call never reached the server
