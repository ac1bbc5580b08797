"""Clients per event loop and concurrency cap, and the RunnableConfig limit that picks one.

A run whose RunnableConfig asks for more than the model's ``max_concurrency`` field gets a
client whose cap allows it (``client_cap``); the number travels in a context variable,
set by the model's ``invoke``/``ainvoke``/``stream``/``astream``/``batch``/``abatch``.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config

from .._client import AsyncClient
from .._config import ClientOptions

__all__ = ["REQUESTED", "LoopClients", "alimited", "client_cap", "limited", "requested_limit"]

REQUESTED: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "modal_llm_langchain_max_concurrency", default=None
)
"""The ``max_concurrency`` of the RunnableConfig being run, if any (picks the client's cap)."""


def client_cap(field: int, requested: int | None) -> int:
    """The ``max_concurrency`` of the client that serves a run.

    ``field`` (the model's ``max_concurrency``) unless the RunnableConfig asks for more;
    then ``requested`` rounded up to a power of two, so a few distinct caps share a client
    each (a batch itself never runs more than ``requested`` at once).
    """
    if requested is None or requested <= field:
        return field
    return 1 << (requested - 1).bit_length()


@contextmanager
def requested_limit(config: RunnableConfig | None) -> Iterator[None]:
    """Make ``config``'s ``max_concurrency`` (or its parent run's) pick the client."""
    token = REQUESTED.set(ensure_config(config).get("max_concurrency"))
    try:
        yield
    finally:
        REQUESTED.reset(token)


class LoopClients:
    """``AsyncClient``s per event loop and cap, each closed inside its loop as it shuts down.

    ``asyncio.run``, ``asyncio.Runner`` and pytest-asyncio call ``loop.shutdown_asyncgens()``
    before closing their loop. A small async generator parked in the loop per client
    (``_closer``) is closed then, and it closes that client while the loop can still run it.
    """

    __slots__ = ("__weakref__", "_by_loop", "_lock")

    def __init__(self) -> None:
        self._by_loop: dict[
            asyncio.AbstractEventLoop,
            dict[int, tuple[AsyncClient, AsyncGenerator[None, None]]],
        ] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(len(by_cap) for by_cap in self._by_loop.values())

    def caps(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        """The caps of the clients ``loop`` has (for tests and debugging)."""
        return sorted(self._by_loop.get(loop, {}))

    async def get(self, cap: int, options: Callable[[int], ClientOptions]) -> AsyncClient:
        """The running loop's client for ``cap``, created from ``options(cap)`` on first use."""
        loop = asyncio.get_running_loop()
        entry = self._by_loop.get(loop)
        found = None if entry is None else entry.get(cap)
        if found is not None:
            return found[0]
        with self._lock:
            for stale in [other for other in self._by_loop if other.is_closed()]:
                del self._by_loop[stale]  # closed without shutdown_asyncgens(): too late
            client = AsyncClient.from_options(options(cap))
            closer = _closer(client, cap, weakref.ref(self))
            self._by_loop.setdefault(loop, {})[cap] = (client, closer)
        await closer.asend(None)  # first iteration: registers it with this loop
        return client

    def forget(self, loop: asyncio.AbstractEventLoop, cap: int, client: AsyncClient) -> None:
        with self._lock:
            by_cap = self._by_loop.get(loop)
            if by_cap is None:
                return
            entry = by_cap.get(cap)
            if entry is not None and entry[0] is client:
                del by_cap[cap]
            if not by_cap:
                del self._by_loop[loop]


async def _closer(
    client: AsyncClient, cap: int, owner: weakref.ref[LoopClients]
) -> AsyncGenerator[None, None]:
    # Holds its owner weakly: a strong reference would make a cycle, and a cycle is
    # collected with every finalizer run at once, so the client would warn before the
    # loop got the chance to close it. Dropped by reference count, this generator goes
    # to the loop's finalizer hook, which schedules aclose() in its loop.
    loop = asyncio.get_running_loop()
    try:
        yield
    finally:
        registry = owner()
        if registry is not None:
            registry.forget(loop, cap, client)
        await client.aclose()


def limited(pieces: Iterator[Any], requested: int | None) -> Iterator[Any]:
    """``pieces`` with ``requested`` picking the client whenever the stream runs."""
    try:
        while True:
            token = REQUESTED.set(requested)
            try:
                piece = next(pieces)
            except StopIteration:
                return
            finally:
                REQUESTED.reset(token)
            yield piece
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


async def alimited(pieces: AsyncIterator[Any], requested: int | None) -> AsyncIterator[Any]:
    """``pieces`` with ``requested`` picking the client whenever the stream runs."""
    try:
        while True:
            token = REQUESTED.set(requested)
            try:
                piece = await anext(pieces)
            except StopAsyncIteration:
                return
            finally:
                REQUESTED.reset(token)
            yield piece
    finally:
        aclose = getattr(pieces, "aclose", None)
        if aclose is not None:
            await aclose()
