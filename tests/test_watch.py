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
    assert a >= loop.time() - 1
