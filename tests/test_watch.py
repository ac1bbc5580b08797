"""FirstByteWatch: shared coarse timers for first-byte timeouts (the unit; the client's use
of it is in tests/client/test_timeouts.py)."""

from __future__ import annotations

import asyncio

import pytest

from modal_llm._watch import FirstByteWatch


async def test_first_byte_watch_buckets() -> None:
    loop = asyncio.get_running_loop()
    watch = FirstByteWatch(loop)
    never = asyncio.Event()
    waiter = asyncio.ensure_future(never.wait())
    other = asyncio.ensure_future(never.wait())
    a = watch.start(0.05, waiter)  # type: ignore[arg-type]
    b = watch.start(0.05, other)  # type: ignore[arg-type]
    watch.stop(b, other)  # the first byte arrived for this one
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert watch.expired(waiter)  # type: ignore[arg-type]
    assert not watch.expired(waiter)  # consumed
    assert not other.done()
    other.cancel()
    assert a is b  # started within one grain, with the same timeout: one bucket, one timer


class _Timers:
    """A stand-in loop that records ``call_later`` instead of running it."""

    def __init__(self) -> None:
        self.later: list[tuple[float, object, tuple[object, ...]]] = []

    def call_later(self, delay: float, callback: object, *args: object) -> None:
        self.later.append((delay, callback, args))

    def run_next(self) -> float:
        delay, callback, args = self.later.pop(0)
        callback(*args)  # type: ignore[operator]
        return delay


async def test_first_byte_bucket_fires_a_full_timeout_after_it_closes() -> None:
    # A bucket's timer counts from when it closed, so a task that joined it late (the close
    # ran late on a busy loop) still gets its whole timeout, never less.
    timers = _Timers()
    watch = FirstByteWatch(timers)  # type: ignore[arg-type]
    never = asyncio.Event()
    early = asyncio.ensure_future(never.wait())
    late = asyncio.ensure_future(never.wait())
    gone = asyncio.ensure_future(never.wait())
    bucket = watch.start(0.8, early)  # type: ignore[arg-type]
    assert watch.start(0.8, late) is bucket  # type: ignore[arg-type]
    assert watch.start(0.8, gone) is bucket  # type: ignore[arg-type]
    watch.stop(bucket, gone)  # type: ignore[arg-type]  # its first byte came
    assert timers.run_next() == 0.8 / 16  # the bucket closes after one grain...
    assert timers.later[0][0] == 0.8  # ...and fires a whole timeout after that
    fresh = asyncio.ensure_future(never.wait())
    assert watch.start(0.8, fresh) is not bucket  # type: ignore[arg-type]  # a closed bucket takes no one
    timers.run_next()  # fires
    await asyncio.sleep(0)
    assert early.cancelled() and late.cancelled() and not gone.done() and not fresh.done()
    assert watch.expired(early) and watch.expired(late)  # type: ignore[arg-type]
    assert not watch.expired(gone)  # type: ignore[arg-type]
    gone.cancel()
    fresh.cancel()


async def test_first_byte_bucket_emptied_before_it_closes_sets_no_timer() -> None:
    timers = _Timers()
    watch = FirstByteWatch(timers)  # type: ignore[arg-type]
    task = asyncio.ensure_future(asyncio.Event().wait())
    bucket = watch.start(0.01, task)  # type: ignore[arg-type]
    watch.stop(bucket, task)  # type: ignore[arg-type]
    assert timers.run_next() == 0.005  # the smallest grain
    assert timers.later == []  # nothing left to fire for
    task.cancel()


# -- Slots: the client's concurrency slots (tests/client/test_concurrency.py: their use) --------


async def test_slots_are_first_come_first_served_and_never_leak() -> None:
    from modal_llm._pacing import Slots

    slots = Slots(1)
    assert slots.take_now() and not slots.take_now()
    order: list[str] = []

    async def take(name: str) -> None:
        await slots.take()
        order.append(name)

    first = asyncio.ensure_future(take("a"))
    cancelled = asyncio.ensure_future(take("b"))
    last = asyncio.ensure_future(take("c"))
    await asyncio.sleep(0)  # all three are in line
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert len(slots.waiters) == 2  # the cancelled waiter left the line
    slots.release()
    await first
    slots.release()
    await last
    assert order == ["a", "c"]
    slots.release()
    assert slots.free == 1 and not slots.waiters


async def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    from modal_llm._pacing import Slots

    slots = Slots(1)
    assert slots.take_now()
    handed = asyncio.ensure_future(slots.take())
    after = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    slots.release()  # handed to the first waiter...
    handed.cancel()  # ...which is cancelled before it runs: the slot goes to the next
    with pytest.raises(asyncio.CancelledError):
        await handed
    await after
    assert slots.free == 0 and not slots.waiters
    slots.release()
    assert slots.free == 1


async def test_a_timed_out_wait_for_a_slot_leaves_the_line() -> None:
    from modal_llm._pacing import Slots

    slots = Slots(1)
    assert slots.take_now()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(slots.take(), 0.01)
    assert not slots.waiters
    slots.release()
    assert slots.take_now()  # free again, nobody in line
