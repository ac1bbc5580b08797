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
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sized,
)
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from ._batch import BatchItem, BatchResult, ProgressCallback, PromptLike
from ._exceptions import ConfigError, ModalLLMError
from ._hooks import AttemptEvent, AttemptHook
from ._pacing import AdaptiveConcurrency, RateLimiter, Slots
from ._progress import Progress

__all__ = ["FanOutPlan", "Send", "fan_out"]

DEFAULT_WINDOW_FACTOR: Final = 2
"""The default ``window`` is this many times the concurrency."""


Send = Callable[[str, Mapping[str, Any] | None, AttemptHook | None], Awaitable[tuple[str, int]]]
"""``await send(prompt, extra, on_attempt)``: one logical call for an item's prompt and its
own model arguments (``None`` when it has none); returns ``(text, attempts)`` or raises
``ModalLLMError``. ``on_attempt``, when not None, must see every attempt of that call
(``AsyncClient._complete(..., on_attempt=...)``)."""


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
        self.sync: Iterator[PromptLike] | None = None
        self._async: AsyncIterator[PromptLike] | None = None
        if isinstance(items, AsyncIterable):
            self._async = aiter(items)
        elif isinstance(items, Iterable):
            self.sync = iter(items)
        else:
            raise ConfigError(f"items must be an iterable or async iterable, not {items!r}")
        self._lock = asyncio.Lock()  # an async generator refuses concurrent __anext__
        self._index = 0
        self.exhausted = False

    def pull_now(self) -> tuple[int, object] | None:
        """The next raw input and its index from a plain iterable (``sync`` is set)."""
        if self.exhausted:
            return None
        assert self.sync is not None
        try:
            raw = next(self.sync)
        except StopIteration:
            self.exhausted = True
            return None
        index = self._index
        self._index = index + 1
        return index, raw

    async def pull(self) -> tuple[int, object] | None:
        """The next raw input and its index, from an async iterable or a plain one."""
        if self.sync is not None:
            return self.pull_now()
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
        return index, raw


def _unpack(raw: object, index: int) -> tuple[str, Hashable, Mapping[str, Any] | None]:
    """An input that is not a plain ``str``: its prompt, id and own extras (or None)."""
    item = as_item(raw, index)
    return item.prompt, index if item.id is None else item.id, item.extra or None


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
        if on_progress is not None and not callable(on_progress):  # before any request
            raise ConfigError(f"on_progress must be callable or None, not {on_progress!r}")
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

    ``send(prompt, extra, on_attempt)`` makes one logical call and returns ``(text, attempts)``
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


def _congestion_hook(limiter: AdaptiveConcurrency, ticket: int, event: AttemptEvent) -> None:
    """One item's attempt observer: a 429/503 on any of its attempts may cut the limit."""
    error = event.error
    if error is not None and limiter.is_congestion(error):
        limiter.on_congestion(ticket)


class _Outbox:
    """Workers' messages on their way to the one consumer (``_run``'s loop)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque[object] = deque()
        self.waiter: asyncio.Future[None] | None = None  # the consumer's, while it waits

    def put(self, message: object) -> None:
        self.items.append(message)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


async def _run(
    send: Send, source: _Source, plan: FanOutPlan, total: int | None
) -> AsyncGenerator[BatchResult, None]:
    loop = asyncio.get_running_loop()
    outbox = _Outbox()
    room = Slots(plan.window)
    limiter = plan.limiter
    rate = plan.rate
    sync = source.sync is not None

    async def worker() -> None:
        try:
            while True:
                if not room.take_now():
                    await room.take()
                # Input first: a worker that finds it exhausted stops at once, without
                # waiting for (or booking) a rate or concurrency slot it would not use.
                pulled = source.pull_now() if sync else await source.pull()
                if pulled is None:
                    break
                index, raw = pulled
                if type(raw) is str:
                    prompt: str = raw
                    ident: Hashable = index
                    extra: Mapping[str, Any] | None = None
                else:
                    prompt, ident, extra = _unpack(raw, index)
                hook: AttemptHook | None = None
                if limiter is not None:
                    ticket = await limiter.acquire()
                    hook = partial(_congestion_hook, limiter, ticket)
                success = False
                try:
                    if rate is not None:
                        await rate.acquire()  # booked only now: a budget is spent on requests sent
                    started = loop.time()
                    try:
                        text, attempts = await send(prompt, extra, hook)
                    except ModalLLMError as exc:
                        latency = loop.time() - started
                        attempts = _attempts_of(exc)
                        result = BatchResult(index, ident, prompt, None, exc, attempts, latency)
                    else:
                        latency = loop.time() - started
                        result = BatchResult(index, ident, prompt, text, None, attempts, latency)
                        success = True
                finally:
                    if limiter is not None:
                        limiter.release(success=success)
                outbox.put(result)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            outbox.put(_Crash(exc))
            return
        outbox.put(_FINISHED)

    bar = None
    tasks = [loop.create_task(worker()) for _ in range(plan.workers)]
    try:
        if plan.progress:
            bar = Progress(total, fallback=False)
        on_progress = plan.on_progress
        ordered = plan.ordered
        messages = outbox.items
        running = len(tasks)
        done = failed = 0
        waiting: dict[int, BatchResult] = {}  # ordered: finished, but behind an earlier item
        next_index = 0
        while running:
            if not messages:
                waiter = outbox.waiter = loop.create_future()
                await waiter
                continue
            message = messages.popleft()
            if message is _FINISHED:
                running -= 1
                continue
            if isinstance(message, _Crash):
                raise message.error
            assert isinstance(message, BatchResult)
            done += 1
            bad = message.error is not None
            if bad:
                failed += 1
            if bar is not None:
                bar.advance(failed=bad)
            if on_progress is not None:
                on_progress(done, total, failed)
            if not ordered:
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
