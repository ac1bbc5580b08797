"""Pacing: slots, a requests-per-second budget and an AIMD limit.

``Slots`` is a first-come first-served semaphore (the client's ``max_concurrency``, a
fan-out's window). ``RateLimiter`` books time slots (GCRA); ``AdaptiveConcurrency`` bounds
requests in flight and moves that bound with the endpoint's 429/503 answers. Both can be
shared between ``map`` calls, also of clients on other event loops and threads (blocking
``Client``s): their state is under a lock and a waiter on another loop is woken on its own
loop. None knows the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Final

from ._exceptions import ConfigError, StatusError

__all__ = ["AdaptiveConcurrency", "RateLimiter", "Slots"]

DEFAULT_DECREASE: Final = 0.7
"""AIMD cut on 429/503. Gentler than halving: the cut happens at most once per window,
and halving on every error is known to collapse throughput (aibrix PR #2452)."""
DEFAULT_CONGESTION_STATUSES: Final = frozenset({429, 503})


class Slots:
    """A first-come first-served semaphore (the client's ``max_concurrency``, a fan-out's
    window) whose uncontended take and release are plain calls: ``asyncio.Semaphore``'s take
    is a coroutine that scans its waiters, twice with a ``locked()`` check first."""

    __slots__ = ("free", "size", "waiters")

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.waiters: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        """Take a slot if one is free and nobody waits for one; False otherwise."""
        if self.free and not self.waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        """Take a slot, waiting in line for one."""
        if self.take_now():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except BaseException:  # cancelled, or Timeout.pool ran out
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # unless release() skipped it
                    self.waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the first live waiter, else to the free count."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class RateLimiter:
    """At most ``rate`` requests per second on average, in bursts of at most ``burst``.

    A reservation clock (GCRA): each ``acquire()`` books the next free slot and sleeps
    until it, once; nothing polls. Share one instance between calls to pace them together.
    ``map`` books a slot only for a request it is about to send, and a wait that is
    cancelled gives its slot back when no later slot was booked after it (so closing a
    map early leaves the budget to the others). ``clock`` (seconds, monotonic) is for
    tests of ``reserve()``.
    """

    def __init__(
        self, rate: float, *, burst: int = 1, clock: Callable[[], float] | None = None
    ) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise ConfigError(f"rate must be a number of requests per second, not {rate!r}")
        if not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(f"rate must be > 0 requests per second, not {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigError(f"burst must be an int >= 1, not {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._interval = 1.0 / self.rate
        self._clock = clock if clock is not None else time.monotonic
        self._next: float | None = None  # theoretical time of the next request
        # Cancelled bookings not yet given back, keyed by the `_next` each one set: a
        # booking is given back once every booking after it is (the tail of the clock).
        self._returned: dict[float, float | None] = {}
        self._booked: tuple[float | None, float] | None = None
        self._lock = threading.Lock()  # shared by maps on several loops or threads

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate:g}, burst={self.burst})"

    def reserve(self) -> float:
        """Book one request; return how many seconds to wait before sending it."""
        now = self._clock()
        before = self._next
        due = now if before is None else max(before, now)
        self._next = after = due + self._interval
        self._booked = (before, after)  # read by acquire() right away, before any await
        allowed_at = due - (self.burst - 1) * self._interval
        return max(0.0, allowed_at - now)

    async def acquire(self) -> None:
        """Wait for this request's slot. A cancelled wait gives the slot back if it can."""
        with self._lock:
            self._take_booking()
            delay = self.reserve()
            booked = self._take_booking()  # None if a subclass's reserve() did not book
        if delay <= 0:
            return
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            if booked is not None:
                with self._lock:
                    self._give_back(*booked)
            raise

    def _take_booking(self) -> tuple[float | None, float] | None:
        booked, self._booked = self._booked, None
        return booked

    def _give_back(self, before: float | None, after: float) -> None:
        returned = self._returned
        returned[after] = before
        # Unwind the tail: the last booking, then the one before it if it was given back too.
        while self._next in returned:
            self._next = returned.pop(self._next)
        if returned:  # bookings in the middle of the clock: stale once their time passed
            now = self._clock()
            for key in [k for k in returned if k <= now]:
                del returned[key]


class AdaptiveConcurrency:
    """An AIMD limit on requests in flight, shared by all workers that use it.

    On a 429 or 503 (any attempt, before its retry) the limit is multiplied by ``decrease``
    (at least -1, never below ``minimum``); failures of requests that were already in
    flight at the last cut are ignored, so the limit drops at most once per window of
    requests. After ``limit`` successful completions in a row without a 429/503, it grows
    by ``increase``, up to ``maximum``.

    Usage::

        limiter = AdaptiveConcurrency(32)
        async for result in client.map(prompts, adaptive=limiter):
            ...
        print(limiter.limit, limiter.lowest)
    """

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        initial: int | None = None,
        decrease: float = DEFAULT_DECREASE,
        increase: int = 1,
        statuses: Collection[int] = DEFAULT_CONGESTION_STATUSES,
    ) -> None:
        for name, value in (("maximum", maximum), ("minimum", minimum), ("increase", increase)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, not {value!r}")
        if minimum > maximum:
            raise ConfigError(f"minimum ({minimum}) must not exceed maximum ({maximum})")
        if initial is None:
            initial = maximum
        if isinstance(initial, bool) or not isinstance(initial, int):
            raise ConfigError(f"initial must be an int, not {initial!r}")
        if not minimum <= initial <= maximum:
            raise ConfigError(f"initial must be between {minimum} and {maximum}, not {initial}")
        if isinstance(decrease, bool) or not isinstance(decrease, (int, float)):
            raise ConfigError(f"decrease must be a number, not {decrease!r}")
        if not 0.0 < decrease < 1.0:
            raise ConfigError(f"decrease must be between 0 and 1 (exclusive), not {decrease!r}")
        self.maximum = maximum
        self.minimum = minimum
        self.decrease = float(decrease)
        self.increase = increase
        self.statuses = frozenset(statuses)
        self.lowest = initial
        """The lowest limit reached so far."""
        self.decreases = 0
        self.increases = 0
        self._limit = initial
        self._in_flight = 0
        self._clean = 0
        self._issued = 0  # tickets handed out: a ticket orders a request against the last cut
        self._cut_at = 0  # requests with a ticket below this were in flight at the last cut
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._lock = threading.Lock()  # shared by maps on several loops or threads

    def __repr__(self) -> str:
        return (
            f"AdaptiveConcurrency(limit={self._limit}, maximum={self.maximum}, "
            f"in_flight={self._in_flight})"
        )

    @property
    def limit(self) -> int:
        """How many requests may be in flight now."""
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def is_congestion(self, error: BaseException) -> bool:
        """Whether ``error`` says the endpoint is saturated (by default 429 or 503)."""
        return isinstance(error, StatusError) and error.status_code in self.statuses

    async def acquire(self) -> int:
        """Wait until a request may start; return its ticket (pass it to ``on_congestion``)."""
        while True:
            with self._lock:
                if self._in_flight < self._limit:
                    self._in_flight += 1
                    self._issued += 1
                    return self._issued - 1
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
            try:
                await waiter  # then check again: another loop may have taken the turn
            except asyncio.CancelledError:
                with self._lock:
                    woken = waiter not in self._waiters
                    if not woken:
                        self._waiters.remove(waiter)
                if woken:
                    self._wake()  # we were woken but leave: pass the turn on
                raise

    def release(self, *, success: bool) -> None:
        """End a request; a success counts towards growing the limit."""
        with self._lock:
            self._in_flight -= 1
            if success:
                self._clean += 1
                if self._clean >= self._limit and self._limit < self.maximum:
                    self._limit = min(self.maximum, self._limit + self.increase)
                    self._clean = 0
                    self.increases += 1
        self._wake()

    def on_congestion(self, ticket: int) -> bool:
        """Record a 429/503 for the request holding ``ticket``; return True if the limit fell."""
        with self._lock:
            self._clean = 0
            if ticket < self._cut_at:
                return False  # it was already in flight when we last cut: same window
            self._cut_at = self._issued
            limit = self._limit
            new = max(self.minimum, min(limit - 1, math.floor(limit * self.decrease)))
            if new == limit:
                return False
            self._limit = new
            self.lowest = min(self.lowest, new)
            self.decreases += 1
            return True

    def _wake(self) -> None:
        """Wake as many waiters as there are free turns, each on its own event loop."""
        with self._lock:
            free = self._limit - self._in_flight
            woken = []
            while free > 0 and self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    woken.append(waiter)
                    free -= 1
        if not woken:
            return
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for waiter in woken:
            loop = waiter.get_loop()
            if loop is here:
                _resolve(waiter)
            else:
                try:
                    loop.call_soon_threadsafe(_resolve, waiter)
                except RuntimeError:  # its loop is closed: nobody waits there any more
                    self._wake()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
