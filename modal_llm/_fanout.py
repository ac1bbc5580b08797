"""Fan-out at scale: many prompts through one client, lazily, with bounded memory.

``fan_out(client, items)`` is the engine behind ``AsyncClient.map``. A fixed set of worker
tasks pulls requests from the input one at a time, so a generator of a million prompts
never becomes a million tasks or coroutines. Memory is bounded by ``window``: at most that
many items are pulled but not yet handed to the consumer (in flight, or finished and
waiting in the output or reorder buffer). Pacing is optional and shared by the call's
workers: a ``RateLimiter`` (requests per second) and an ``AdaptiveConcurrency`` limit that
backs off on 429/503 and grows back when requests succeed again (AIMD).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sized,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ._config import USE_CLIENT_DEFAULT, TimeoutTypes, _UseClientDefault
from ._exceptions import ConfigError, ModalLLMError, StatusError
from ._types import HeaderTypes, StopTypes

if TYPE_CHECKING:
    from ._client import AsyncClient

__all__ = [
    "AdaptiveConcurrency",
    "BatchItem",
    "BatchResult",
    "RateLimiter",
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
    ``clock`` (seconds, monotonic) is for tests of ``reserve()``.
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

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate:g}, burst={self.burst})"

    def reserve(self) -> float:
        """Book one request; return how many seconds to wait before sending it."""
        now = self._clock()
        due = now if self._next is None else max(self._next, now)
        self._next = due + self._interval
        allowed_at = due - (self.burst - 1) * self._interval
        return max(0.0, allowed_at - now)

    async def acquire(self) -> None:
        """Wait for this request's slot. A cancelled wait leaves its slot unused."""
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


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


# The ticket of the request a worker task is running, so that the client's failure
# listener (called in that task, before any retry) can tell whose attempt failed.
_TICKET: contextvars.ContextVar[tuple[object, int] | None] = contextvars.ContextVar(
    "modal_llm_fanout_ticket", default=None
)


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


def _progress_bar_class() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        raise ConfigError(
            "progress=True needs tqdm; install it with: pip install 'modal-llm[progress]' "
            "(or pass on_progress=callback)"
        ) from None
    return tqdm


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything one fan-out call decided before starting (strictly private)."""

    workers: int
    window: int
    ordered: bool
    rate: RateLimiter | None
    limiter: AdaptiveConcurrency | None
    total: int | None
    on_progress: ProgressCallback | None
    bar_class: Any
    stop: StopTypes
    headers: HeaderTypes
    timeout: TimeoutTypes | _UseClientDefault
    extra: dict[str, Any]


def fan_out(
    client: AsyncClient,
    items: Iterable[PromptLike] | AsyncIterable[PromptLike],
    *,
    ordered: bool = False,
    concurrency: int | None = None,
    window: int | None = None,
    rate_limit: float | RateLimiter | None = None,
    adaptive: bool | AdaptiveConcurrency = False,
    progress: bool = False,
    on_progress: ProgressCallback | None = None,
    total: int | None = None,
    stop: StopTypes = None,
    headers: HeaderTypes = None,
    timeout: TimeoutTypes | _UseClientDefault = USE_CLIENT_DEFAULT,
    extra: Mapping[str, Any] | None = None,
) -> AsyncGenerator[BatchResult, None]:
    """Generate for every item of ``items``; yield a ``BatchResult`` per item.

    ``items`` is any iterable or async iterable of prompts, ``BatchItem``s or mappings
    ``{"prompt": ..., "id": ..., **extra}``; it is pulled lazily. Results come as they
    complete, or in input order with ``ordered=True``. ``concurrency`` (default: the
    client's ``max_concurrency``) bounds items in flight; ``window`` (default twice that)
    bounds items pulled but not yet yielded, which bounds memory and, with ``ordered``,
    the reorder buffer. ``rate_limit`` paces requests per second; ``adaptive`` backs off
    on 429/503. ``progress=True`` shows a tqdm bar; ``on_progress(done, total, failed)``
    is called after each result. ``stop``, ``headers``, ``timeout`` and ``extra`` apply to
    every item (an item's own extras win). Failed items carry their ``ModalLLMError``;
    any other exception propagates. Closing the iterator (``break`` then garbage
    collection, ``aclose()``, or cancelling the consumer) cancels requests in flight.
    """
    source = _Source(items)
    limiter: AdaptiveConcurrency | None = None
    if isinstance(adaptive, AdaptiveConcurrency):
        limiter = adaptive
        default_concurrency = adaptive.maximum
    elif isinstance(adaptive, bool):
        default_concurrency = client.options.max_concurrency
    else:
        raise ConfigError(f"adaptive must be a bool or an AdaptiveConcurrency, not {adaptive!r}")
    workers = _positive("concurrency", default_concurrency if concurrency is None else concurrency)
    if adaptive is True:
        limiter = AdaptiveConcurrency(workers)
    if window is None:
        window = DEFAULT_WINDOW_FACTOR * workers
    window = _positive("window", window)
    if isinstance(rate_limit, RateLimiter) or rate_limit is None:
        rate = rate_limit
    else:
        rate = RateLimiter(rate_limit)
    if total is None and isinstance(items, Sized):
        total = len(items)
    shared = dict(extra or {})
    if "prompt" in shared:
        raise ConfigError("extra must not contain 'prompt'")
    plan = _Plan(
        workers=min(workers, window),
        window=window,
        ordered=ordered,
        rate=rate,
        limiter=limiter,
        total=total,
        on_progress=on_progress,
        bar_class=_progress_bar_class() if progress else None,
        stop=stop,
        headers=headers,
        timeout=timeout,
        extra=shared,
    )
    return _run(client, source, plan)


async def _run(
    client: AsyncClient, source: _Source, plan: _Plan
) -> AsyncGenerator[BatchResult, None]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    room = asyncio.Semaphore(plan.window)
    limiter = plan.limiter
    run_id = object()

    def on_failure(error: ModalLLMError) -> None:
        ticket = _TICKET.get()
        if (
            limiter is not None
            and ticket is not None
            and ticket[0] is run_id
            and limiter.is_congestion(error)
        ):
            limiter.on_congestion(ticket[1])

    async def send(index: int, item: BatchItem) -> BatchResult:
        extra = {**plan.extra, **item.extra} if item.extra else plan.extra
        ident: Hashable = index if item.id is None else item.id
        started = loop.time()
        try:
            text, attempts = await client._generate(
                item.prompt, plan.stop, plan.headers, plan.timeout, extra
            )
        except ModalLLMError as exc:
            latency = loop.time() - started
            return BatchResult(index, ident, item.prompt, None, exc, _attempts_of(exc), latency)
        return BatchResult(index, ident, item.prompt, text, None, attempts, loop.time() - started)

    async def worker() -> None:
        try:
            while True:
                await room.acquire()
                ticket = None if limiter is None else await limiter.acquire()
                success = False
                try:
                    if plan.rate is not None:
                        await plan.rate.acquire()
                    pulled = await source.pull()
                    if pulled is None:
                        break
                    if ticket is not None:
                        _TICKET.set((run_id, ticket))
                    result = await send(*pulled)
                    success = result.ok
                finally:
                    if limiter is not None:
                        limiter.release(success=success)
                queue.put_nowait(result)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(_Crash(exc))
            return
        queue.put_nowait(_FINISHED)

    bar = None
    if limiter is not None:
        client._failure_listeners.append(on_failure)
    tasks = [loop.create_task(worker()) for _ in range(plan.workers)]
    try:
        if plan.bar_class is not None:
            bar = plan.bar_class(total=plan.total, unit="prompt", dynamic_ncols=True)
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
                if not message.ok:
                    bar.set_postfix(failed=failed, refresh=False)
                bar.update(1)
            if plan.on_progress is not None:
                plan.on_progress(done, plan.total, failed)
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
        if limiter is not None:
            client._failure_listeners.remove(on_failure)
        if bar is not None:
            bar.close()
