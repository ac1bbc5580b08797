"""Batches: the fan-out's public value types, and ``generate_many``'s bounded gather.

``BatchItem``, ``BatchResult`` and their aliases live here rather than in ``_fanout`` (the
engine behind ``map``) so that ``import modal_llm`` need not load the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._exceptions import ModalLLMError

__all__ = ["BatchItem", "BatchResult", "ProgressCallback", "PromptLike", "gather_bounded"]

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
