"""First-byte and stream read timeouts for many requests with a few coarse timers.

An asyncio timer per request (aiohttp's ``total`` or ``sock_read``) costs a heap push, a
cancel and a re-arm per packet: about a tenth of a small request's CPU. Here requests
share one timer per time bucket; a bucket is ``1/16`` of the timeout wide, so a timeout
fires at most 6 % late (a 600 s cold-start bound fires by 637.5 s, loop lag aside).

A fired timer cancels the waiting task, as ``asyncio.timeout`` does; the client turns
that cancellation back into ``EndpointTimeoutError`` with ``expired()``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final, Protocol

import aiohttp

__all__ = ["FirstByteWatch", "SilenceEntry", "SilenceWatch"]

_GRAIN_FRACTION: Final = 1 / 16
_MIN_GRAIN: Final = 0.005


class FirstByteWatch:
    """Buckets of tasks waiting for a first byte, one loop timer per bucket. Strictly private.

    A bucket takes the tasks that start waiting, with the same timeout, during one grain;
    then it closes and fires ``seconds`` later, so each of its tasks waits at least
    ``seconds`` and at most a grain (plus any loop lag) more. Starting to watch a task
    reads no clock: a dict lookup and a set add.
    """

    __slots__ = ("_expired", "_loop", "_open")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._open: dict[float, set[asyncio.Task[object]]] = {}  # per timeout: its open bucket
        self._expired: set[asyncio.Task[object]] = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def start(self, seconds: float, task: asyncio.Task[object]) -> set[asyncio.Task[object]]:
        """Watch ``task`` for ``seconds``; return its bucket for ``stop``."""
        bucket = self._open.get(seconds)
        if bucket is None:
            bucket = self._open[seconds] = set()
            grain = max(seconds * _GRAIN_FRACTION, _MIN_GRAIN)
            self._loop.call_later(grain, self._close, seconds, bucket)
        bucket.add(task)
        return bucket

    @staticmethod
    def stop(bucket: set[asyncio.Task[object]], task: asyncio.Task[object]) -> None:
        """The first byte arrived (or the request ended): stop watching ``task``."""
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

    def _close(self, seconds: float, bucket: set[asyncio.Task[object]]) -> None:
        # Timed from now, not from when the bucket opened: a late close (a busy loop) must
        # not make the bucket fire early for the tasks that joined it meanwhile.
        if self._open.get(seconds) is bucket:
            del self._open[seconds]
        if bucket:
            self._loop.call_later(seconds, self._fire, bucket)

    def _fire(self, bucket: set[asyncio.Task[object]]) -> None:
        for task in bucket:
            if not task.done():
                self._expired.add(task)
                task.cancel()


class SilenceWatch:
    """Between-chunks (read) timeouts of open streams, one sweep timer for all of them.

    aiohttp's ``sock_read`` re-arms a loop timer on every packet: for a stream of small
    pieces that is a timer cancel and heap push per piece. Here a sweep every ``1/32`` of
    the timeout looks at each watched body's byte counters instead, so a piece costs
    nothing. A body is silent while no byte arrives; as with aiohttp's timer, which stops
    while a slow caller leaves so much unread that reading is paused, the clock restarts
    while ``_PAUSED_BYTES`` or more are unread. After ``seconds`` of silence the body's
    reader gets aiohttp's own read-timeout error, within about 6 % (two sweeps) of when
    aiohttp's timer would have fired.
    """

    __slots__ = ("_entries", "_grain", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._entries: set[SilenceEntry] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._grain = math.inf

    def watch(self, body: _Body, seconds: float) -> SilenceEntry:
        """Watch ``body`` (an ``Opened`` stream) for ``seconds`` of silence; ``cancel()`` the
        returned entry when the body is released."""
        entry = SilenceEntry(self, body, seconds, _arrived(body), self._loop.time())
        self._entries.add(entry)
        grain = max(seconds * _SILENCE_GRAIN_FRACTION, _MIN_GRAIN)
        if grain < self._grain:
            if self._handle is not None:
                self._handle.cancel()
            self._grain = grain
            self._handle = self._loop.call_later(grain, self._sweep)
        return entry

    def _sweep(self) -> None:
        self._handle = None
        self._grain = math.inf
        now = self._loop.time()
        fired = []
        for entry in self._entries:
            body = entry.body
            content = body.resp.content
            if content.is_eof() or content.exception() is not None:
                continue  # nothing more to wait for; released soon
            arrived = _arrived(body)
            if arrived != entry.arrived or content.total_bytes - body.received >= _PAUSED_BYTES:
                entry.arrived = arrived  # bytes came, or a slow caller has reading paused
                entry.since = now
            elif now - entry.since >= entry.seconds:
                fired.append(entry)
        for entry in fired:
            self._entries.discard(entry)
            entry.body.resp.content.set_exception(
                aiohttp.ServerTimeoutError("Timeout on reading data from socket")
            )
        if self._entries:
            grain = min(max(e.seconds * _SILENCE_GRAIN_FRACTION, _MIN_GRAIN) for e in self._entries)
            self._grain = grain
            self._handle = self._loop.call_later(grain, self._sweep)


_SILENCE_GRAIN_FRACTION: Final = 1 / 32
_PAUSED_BYTES: Final = 2**16
"""Unread bytes from which aiohttp may hold reading paused (its default ``read_bufsize``,
the low-water mark of a response's ``StreamReader``)."""


class _Body(Protocol):
    resp: aiohttp.ClientResponse
    received: int


def _arrived(body: _Body) -> tuple[int, int]:
    """Bytes that reached the reader: decoded, and on the wire (they differ when compressed)."""
    content = body.resp.content
    return content.total_bytes, getattr(content, "total_raw_bytes", 0)


class SilenceEntry:
    """One body watched by a ``SilenceWatch`` (``Opened.silence``): its read timeout."""

    __slots__ = ("arrived", "body", "seconds", "since", "watch")

    def __init__(
        self,
        watch: SilenceWatch,
        body: _Body,
        seconds: float,
        arrived: tuple[int, int],
        since: float,
    ) -> None:
        self.watch = watch
        self.body = body
        self.seconds = seconds
        self.arrived = arrived
        self.since = since

    def cancel(self) -> None:
        self.watch._entries.discard(self)  # the sweep stops by itself once none are left
