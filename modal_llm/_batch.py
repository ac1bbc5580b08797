"""Batches: the fan-out's public value types, and bounded workers (gather, as completed).

``BatchItem``, ``BatchResult`` and their aliases live here rather than in ``_fanout`` (the
engine behind ``map``) so that ``import modal_llm`` need not load the engine.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Sized,
)
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

from ._exceptions import ModalLLMError
from ._pacing import Slots

__all__ = [
    "BatchItem",
    "BatchResult",
    "ProgressCallback",
    "PromptLike",
    "as_completed_bounded",
    "gather_bounded",
]

T = TypeVar("T")
R = TypeVar("R")


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


async def gather_bounded(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T],
    *,
    concurrency: int,
    return_exceptions: bool = False,
) -> list[R | BaseException]:
    """Apply ``fn`` to every item with at most ``concurrency`` running; results in input order.

    Workers pull items one at a time, so no more than ``concurrency`` coroutines exist at
    once whatever the input size. Without ``return_exceptions`` the first failure cancels
    the rest and is raised; with it, each failing slot holds its exception.
    """
    results: list[R | BaseException] = []
    source = enumerate(items)

    async def worker() -> None:
        for index, item in source:
            while len(results) <= index:
                results.append(_PENDING)  # type: ignore[arg-type]
            try:
                results[index] = await fn(item)
            except Exception as exc:
                if not return_exceptions:
                    raise
                results[index] = exc

    size = len(items) if isinstance(items, Sized) else concurrency
    workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(concurrency, size)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    return results


_PENDING = object()


class _Failure:
    """A worker's item raised (``return_exceptions`` off) or the worker itself broke."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_EXHAUSTED: Final = object()  # a worker found no item left and stopped


async def as_completed_bounded(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T],
    *,
    concurrency: int,
    return_exceptions: bool = False,
) -> AsyncGenerator[tuple[int, R | Exception], None]:
    """Apply ``fn`` to every item with at most ``concurrency`` running; yield
    ``(index, outcome)`` as each finishes, every index exactly once.

    Workers pull items one at a time, as in ``gather_bounded``, and at most twice
    ``concurrency`` items are pulled and not yet yielded (a consumer that falls behind
    holds the workers back), so memory is bounded by the concurrency, not by the input.
    With ``return_exceptions`` a failing item's outcome is its exception; without it the
    first failure is raised where it comes in the results and the rest are cancelled.
    Closing the generator early (``break``, ``aclose()``) cancels the work in flight.
    """
    loop = asyncio.get_running_loop()
    source = enumerate(items)
    room = Slots(2 * concurrency)
    outbox: deque[object] = deque()
    waiter: asyncio.Future[None] | None = None  # the consumer's, while it waits

    def put(message: object) -> None:
        nonlocal waiter
        outbox.append(message)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
            waiter = None

    async def worker() -> None:
        try:
            while True:
                if not room.take_now():
                    await room.take()
                pulled = next(source, None)
                if pulled is None:
                    break
                index, item = pulled
                try:
                    outcome: R | Exception = await fn(item)
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    outcome = exc
                put((index, outcome))
        except BaseException as exc:
            put(_Failure(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        put(_EXHAUSTED)

    size = len(items) if isinstance(items, Sized) else concurrency
    tasks = [loop.create_task(worker()) for _ in range(max(1, min(concurrency, size)))]
    try:
        running = len(tasks)
        while running:
            if not outbox:
                waiter = loop.create_future()
                await waiter
                continue
            message = outbox.popleft()
            if message is _EXHAUSTED:
                running -= 1
                continue
            if isinstance(message, _Failure):
                raise message.error
            room.release()
            yield cast("tuple[int, R | Exception]", message)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
