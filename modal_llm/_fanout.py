"""Fan-out at scale: many prompts through one send callable, lazily, with bounded memory.

``fan_out(send, items, plan)`` is the engine behind ``AsyncClient.map``, which builds
both the ``send`` callable (one logical call of the client) and the ``FanOutPlan`` (its
options, validated once); this module knows nothing of the client. A fixed set of worker
tasks pulls requests from the input one at a time, so a generator of a million prompts
never becomes a million tasks or coroutines. Memory is bounded by ``window``: at most that
many items are pulled but not yet handed to the consumer (in flight, or finished and
waiting in the output or reorder buffer). Pacing is optional and shared by the call's
workers: a ``RateLimiter`` (requests per second) and an ``AdaptiveConcurrency`` limit that
backs off on 429/503 and grows back when requests succeed again (AIMD); each item's
attempts reach the limit through that item's own ``on_attempt`` observer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sized,
)
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

from ._exceptions import ConfigError, ModalLLMError, StatusError
from ._progress import Progress

__all__ = [
    "AdaptiveConcurrency",
    "AttemptOutcome",
    "BatchItem",
    "BatchResult",
    "FanOutPlan",
    "RateLimiter",
    "Send",
    "fan_out",
]

DEFAULT_WINDOW_FACTOR: Final = 2
"""The default ``window`` is this many times the concurrency."""
DEFAULT_DECREASE: Final = 0.7
"""AIMD cut on 429/503. Gentler than halving: the cut happens at most once per window,
and halving on every error is known to collapse throughput (aibrix PR #2452)."""
DEFAULT_CONGESTION_STATUSES: Final = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request of a fan-out: a prompt with its own id and model arguments.

    ``extra`` is merged over the call's shared keyword arguments. The result's ``id`` is
    ``id``, or the item's index when ``id`` is None.
    """

    prompt: str
    id: Hashable | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


PromptLike = str | BatchItem | Mapping[str, Any]
"""One input of a fan-out: a prompt, a ``BatchItem``, or a mapping with ``"prompt"``."""
ProgressCallback = Callable[[int, int | None, int], None]
"""``on_progress(done, total_or_None, failed)``, called after each result."""


class AttemptOutcome(Protocol):
    """What fan-out reads of one attempt's event (the client's ``AttemptEvent``)."""

    @property
    def error(self) -> ModalLLMError | None:
        """The attempt's error; None when it succeeded."""
        ...


AttemptObserver = Callable[[AttemptOutcome], None]
"""Called with every attempt event of one logical call (sync, on the loop)."""
Send = Callable[[BatchItem, AttemptObserver | None], Awaitable[tuple[str, int]]]
"""``await send(item, on_attempt)``: one logical call for ``item``; returns ``(text,
attempts)`` or raises ``ModalLLMError``. ``on_attempt``, when not None, must see every
attempt of that call (``AsyncClient._complete(..., on_attempt=...)``)."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of one item: ``text`` or ``error``, never both.

    ``index`` is the item's 0-based position in the input; ``id`` is its own id or, when it
    had none, ``index``. ``attempts`` counts HTTP attempts of the POST (0 when nothing was
    sent); ``latency`` is seconds from sending the first attempt to the outcome, retries and
    backoff included.
    """

    index: int
    id: Hashable
    prompt: str
    text: str | None
    error: ModalLLMError | None
    attempts: int
    latency: float

    @property
    def ok(self) -> bool:
        """True when the item produced text."""
        return self.error is None


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
        self._take_booking()
        delay = self.reserve()
        booked = self._take_booking()  # None if a subclass's reserve() did not book with ours
        if delay <= 0:
            return
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            if booked is not None:
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
        while self._in_flight >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake()  # we were woken but leave: pass the turn on
                raise
        self._in_flight += 1
        self._issued += 1
        return self._issued - 1

    def release(self, *, success: bool) -> None:
        """End a request; a success counts towards growing the limit."""
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
        self._clean = 0
        if ticket < self._cut_at:
            return False  # it was already in flight when we last cut: same window
        self._cut_at = self._issued
        new = max(self.minimum, min(self._limit - 1, math.floor(self._limit * self.decrease)))
        if new == self._limit:
            return False
        self._limit = new
        self.lowest = min(self.lowest, new)
        self.decreases += 1
        return True

    def _wake(self) -> None:
        free = self._limit - self._in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class _Crash:
    """A worker hit something that is not a ``ModalLLMError``: a bug to re-raise."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_FINISHED: Final = object()  # a worker found the input exhausted and stopped


class _Source:
    """The input, pulled one item at a time by any number of workers."""

    def __init__(self, items: Iterable[PromptLike] | AsyncIterable[PromptLike]) -> None:
        if isinstance(items, (str, bytes, Mapping, BatchItem)):
            raise ConfigError(
                "items must be an iterable of prompts or requests, not a single "
                f"{type(items).__name__}"
            )
        self._sync: Iterator[PromptLike] | None = None
        self._async: AsyncIterator[PromptLike] | None = None
        if isinstance(items, AsyncIterable):
            self._async = aiter(items)
        elif isinstance(items, Iterable):
            self._sync = iter(items)
        else:
            raise ConfigError(f"items must be an iterable or async iterable, not {items!r}")
        self._lock = asyncio.Lock()  # an async generator refuses concurrent __anext__
        self._index = 0
        self.exhausted = False

    async def pull(self) -> tuple[int, BatchItem] | None:
        if self._sync is not None:
            if self.exhausted:
                return None
            try:
                raw = next(self._sync)
            except StopIteration:
                self.exhausted = True
                return None
        else:
            assert self._async is not None
            async with self._lock:
                if self.exhausted:
                    return None
                try:
                    raw = await anext(self._async)
                except StopAsyncIteration:
                    self.exhausted = True
                    return None
        index = self._index
        self._index += 1
        return index, as_item(raw, index)


def as_item(raw: object, index: int) -> BatchItem:
    """Normalise one input (a prompt, a ``BatchItem`` or a mapping) into a ``BatchItem``."""
    if isinstance(raw, str):
        return BatchItem(raw)
    if isinstance(raw, BatchItem):
        item = raw
        prompt: object = raw.prompt
    elif isinstance(raw, Mapping):
        prompt = raw.get("prompt")
        extra = {k: v for k, v in raw.items() if k not in ("prompt", "id")}
        item = BatchItem(prompt if isinstance(prompt, str) else "", raw.get("id"), extra)
    else:
        raise ConfigError(
            f"item {index} must be a str, a BatchItem or a mapping with a 'prompt', "
            f"not {type(raw).__name__}"
        )
    if not isinstance(prompt, str):
        raise ConfigError(f"item {index}: prompt must be a str, not {type(prompt).__name__}")
    if "prompt" in item.extra:
        raise ConfigError(f"item {index}: extra must not contain 'prompt'")
    return item


def _attempts_of(error: ModalLLMError) -> int:
    if error.attempts is not None:
        return error.attempts
    return 0 if isinstance(error, ConfigError) else 1


def _require_tqdm() -> None:
    """``progress=True`` without tqdm: raise ``Progress``'s ``ConfigError`` (with the hint) now."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        Progress(None, fallback=False)  # raises


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class FanOutPlan:
    """How one fan-out runs, decided and validated once, before anything starts.

    Built only by :meth:`build`, from ``AsyncClient.map``'s own options (the one place
    they are written out). ``workers`` is how many items may be in flight; ``window``
    bounds items pulled but not yet yielded.
    """

    workers: int
    window: int
    ordered: bool
    rate: RateLimiter | None
    limiter: AdaptiveConcurrency | None
    total: int | None
    on_progress: ProgressCallback | None
    progress: bool

    @classmethod
    def build(
        cls,
        *,
        cap: int,
        ordered: bool,
        concurrency: int | None,
        window: int | None,
        rate_limit: float | RateLimiter | None,
        adaptive: bool | AdaptiveConcurrency,
        progress: bool,
        on_progress: ProgressCallback | None,
        total: int | None,
    ) -> FanOutPlan:
        """Validate ``map``'s options against the client's ``max_concurrency`` (``cap``).

        The concurrency rule (docs/batch.md): the client's ``max_concurrency`` is the one
        cap on requests in flight. ``concurrency`` (or an ``AdaptiveConcurrency``'s
        ``maximum``) may ask for at most that, and for no more than ``window`` allows;
        asking for more raises ``ConfigError`` naming both numbers, never a silent cap.
        """
        limiter: AdaptiveConcurrency | None = None
        if isinstance(adaptive, AdaptiveConcurrency):
            limiter = adaptive
        elif not isinstance(adaptive, bool):
            raise ConfigError(
                f"adaptive must be a bool or an AdaptiveConcurrency, not {adaptive!r}"
            )
        if window is not None:
            window = _positive("window", window)
        if concurrency is not None:
            workers = _positive("concurrency", concurrency)
            asked = f"concurrency={workers}"
        elif limiter is not None:
            workers = limiter.maximum
            asked = f"AdaptiveConcurrency(maximum={workers})"
        else:  # nothing asked: as many as the client and the window allow
            workers = cap if window is None else min(cap, window)
            asked = ""
        if asked:
            if workers > cap:
                raise ConfigError(
                    f"{asked} exceeds the client's max_concurrency={cap}: ask for at most "
                    f"{cap}, or build the client with max_concurrency={workers}"
                )
            if window is not None and workers > window:
                raise ConfigError(
                    f"{asked} exceeds window={window}: at most `window` items are in "
                    "flight; raise window or lower the concurrency"
                )
        if limiter is not None and limiter.maximum > workers:
            raise ConfigError(
                f"AdaptiveConcurrency(maximum={limiter.maximum}) exceeds concurrency={workers}; "
                "the limit could never reach its maximum"
            )
        if adaptive is True:
            limiter = AdaptiveConcurrency(workers)
        if isinstance(rate_limit, RateLimiter) or rate_limit is None:
            rate = rate_limit
        else:
            rate = RateLimiter(rate_limit)
        if progress:
            _require_tqdm()
        if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
            raise ConfigError(f"total must be an int or None, not {total!r}")
        return cls(
            workers=workers,
            window=DEFAULT_WINDOW_FACTOR * workers if window is None else window,
            ordered=bool(ordered),
            rate=rate,
            limiter=limiter,
            total=total,
            on_progress=on_progress,
            progress=bool(progress),
        )


def fan_out(
    send: Send,
    items: Iterable[PromptLike] | AsyncIterable[PromptLike],
    plan: FanOutPlan,
) -> AsyncGenerator[BatchResult, None]:
    """Run ``send`` for every item of ``items`` as ``plan`` says; yield a ``BatchResult`` each.

    ``send(item, on_attempt)`` makes one logical call and returns ``(text, attempts)``
    or raises a ``ModalLLMError``; ``on_attempt`` (None unless the plan is adaptive) must
    be called with every attempt event of that call, so that its 429/503 answers reach
    the adaptive limit. ``items`` is pulled lazily. Failed items carry their
    ``ModalLLMError``; any other exception propagates. Closing the iterator (``break``
    then garbage collection, ``aclose()``, cancelling the consumer) cancels what is in
    flight. Raises ``ConfigError`` at once if ``items`` is not an iterable of prompts.
    """
    source = _Source(items)
    total = plan.total
    if total is None and isinstance(items, Sized):
        total = len(items)
    return _run(send, source, plan, total)


def _congestion_hook(limiter: AdaptiveConcurrency, ticket: int, event: AttemptOutcome) -> None:
    """One item's attempt observer: a 429/503 on any of its attempts may cut the limit."""
    error = event.error
    if error is not None and limiter.is_congestion(error):
        limiter.on_congestion(ticket)


async def _run(
    send: Send, source: _Source, plan: FanOutPlan, total: int | None
) -> AsyncGenerator[BatchResult, None]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    room = asyncio.Semaphore(plan.window)
    limiter = plan.limiter
    rate = plan.rate

    async def one(index: int, item: BatchItem, on_attempt: AttemptObserver | None) -> BatchResult:
        ident: Hashable = index if item.id is None else item.id
        if rate is not None:
            await rate.acquire()  # booked only now: a budget is spent on requests sent
        started = loop.time()
        try:
            text, attempts = await send(item, on_attempt)
        except ModalLLMError as exc:
            latency = loop.time() - started
            return BatchResult(index, ident, item.prompt, None, exc, _attempts_of(exc), latency)
        return BatchResult(index, ident, item.prompt, text, None, attempts, loop.time() - started)

    async def worker() -> None:
        try:
            while True:
                await room.acquire()
                # Input first: a worker that finds it exhausted stops at once, without
                # waiting for (or booking) a rate or concurrency slot it would not use.
                pulled = await source.pull()
                if pulled is None:
                    break
                index, item = pulled
                if limiter is None:
                    result = await one(index, item, None)
                else:
                    ticket = await limiter.acquire()
                    success = False
                    try:
                        hook = partial(_congestion_hook, limiter, ticket)
                        result = await one(index, item, hook)
                        success = result.ok
                    finally:
                        limiter.release(success=success)
                queue.put_nowait(result)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(_Crash(exc))
            return
        queue.put_nowait(_FINISHED)

    bar = None
    tasks = [loop.create_task(worker()) for _ in range(plan.workers)]
    try:
        if plan.progress:
            bar = Progress(total, fallback=False)
        running = len(tasks)
        done = failed = 0
        waiting: dict[int, BatchResult] = {}  # ordered: finished, but behind an earlier item
        next_index = 0
        while running:
            message = await queue.get()
            if message is _FINISHED:
                running -= 1
                continue
            if isinstance(message, _Crash):
                raise message.error
            assert isinstance(message, BatchResult)
            done += 1
            if not message.ok:
                failed += 1
            if bar is not None:
                bar.advance(failed=not message.ok)
            if plan.on_progress is not None:
                plan.on_progress(done, total, failed)
            if not plan.ordered:
                room.release()
                yield message
                continue
            waiting[message.index] = message
            while next_index in waiting:
                result = waiting.pop(next_index)
                next_index += 1
                room.release()
                yield result
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if bar is not None:
            bar.close()
