"""First-byte timeouts for many requests with a few coarse timers instead of one each.

An asyncio timer per request (aiohttp's ``total`` or ``sock_read``) costs a heap push, a
cancel and a re-arm per packet: about a tenth of a small request's CPU. Here requests
share one timer per time bucket; a bucket is ``1/16`` of the timeout wide, so a timeout
fires at most 6 % late (a 600 s cold-start bound fires by 637.5 s).

A fired timer cancels the waiting task, as ``asyncio.timeout`` does; the client turns
that cancellation back into ``EndpointTimeoutError`` with ``expired()``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final

__all__ = ["FirstByteWatch"]

_GRAIN_FRACTION: Final = 1 / 16
_MIN_GRAIN: Final = 0.005


class FirstByteWatch:
    """Buckets of tasks waiting for a first byte, one loop timer per bucket. Strictly private."""

    __slots__ = ("_buckets", "_expired", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[float, set[asyncio.Task[object]]] = {}
        self._expired: set[asyncio.Task[object]] = set()

    def start(self, seconds: float, task: asyncio.Task[object]) -> float:
        """Watch ``task`` for ``seconds``; return the bucket key for ``stop``."""
        grain = max(seconds * _GRAIN_FRACTION, _MIN_GRAIN)
        when = math.ceil((self._loop.time() + seconds) / grain) * grain
        bucket = self._buckets.get(when)
        if bucket is None:
            bucket = self._buckets[when] = set()
            self._loop.call_at(when, self._fire, when)
        bucket.add(task)
        return when

    def stop(self, when: float, task: asyncio.Task[object]) -> None:
        """The first byte arrived (or the request ended): stop watching ``task``."""
        bucket = self._buckets.get(when)
        if bucket is not None:
            bucket.discard(task)

    def expired(self, task: asyncio.Task[object]) -> bool:
        """Whether a cancellation of ``task`` came from this watch; consumes it if so."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+: undo our cancel() count
        if uncancel is not None:
            uncancel()
        return True

    def _fire(self, when: float) -> None:
        for task in self._buckets.pop(when, ()):
            if not task.done():
                self._expired.add(task)
                task.cancel()
