"""Bounded fan-out: run a coroutine function over many inputs with a fixed worker window."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sized
from typing import TypeVar

__all__ = ["gather_bounded"]

T = TypeVar("T")
R = TypeVar("R")


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
