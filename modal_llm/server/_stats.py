"""ServerStats: what the reference endpoint saw (counters, statuses, recent headers and bodies)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

from ._config import RECENT_KEPT


@dataclass
class ServerStats:
    """What the server saw, for tests and the demo; mutated by the server as it runs.

    ``await stats.wait_for(lambda s: s.disconnects == 1)`` waits for a condition without sleeping.
    """

    requests: int = 0
    posts: int = 0
    gets: int = 0
    generations_started: int = 0
    """Work actually started: one per reply generated, never one per poll."""
    generations_finished: int = 0
    cold_starts: int = 0
    in_flight: int = 0
    """Requests being handled right now."""
    max_in_flight: int = 0
    disconnects: int = 0
    """Clients that went away mid-stream or while waiting for an answer."""
    statuses: dict[int, int] = field(default_factory=dict)
    """How many replies had each status."""
    # Headers and bodies stay out of repr: they can hold Modal-Key/Modal-Secret.
    last_headers: CIMultiDict[str] = field(default_factory=CIMultiDict, repr=False)
    """A copy of the last request's headers."""
    recent_headers: deque[CIMultiDict[str]] = field(
        default_factory=lambda: deque(maxlen=RECENT_KEPT), repr=False
    )
    """Headers of the last requests, oldest first."""
    bodies: deque[Any] = field(default_factory=lambda: deque(maxlen=RECENT_KEPT), repr=False)
    """The last POST bodies, decoded from JSON when they were JSON, else raw bytes."""
    _waiters: list[tuple[Callable[[ServerStats], bool], asyncio.Future[None]]] = field(
        default_factory=list, repr=False, compare=False
    )

    async def wait_for(
        self, predicate: Callable[[ServerStats], bool], timeout: float | None = 10.0
    ) -> None:
        """Return once ``predicate(self)`` holds; raise ``TimeoutError`` after ``timeout``."""
        if predicate(self):
            return
        waiter = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[1], timeout)
        finally:
            self._waiters.remove(waiter)

    def notify(self) -> None:
        """Wake the :meth:`wait_for` callers whose condition now holds (the server calls it)."""
        for predicate, future in self._waiters:
            if not future.done() and predicate(self):
                future.set_result(None)

    def count_status(self, status: int) -> None:
        """Count one reply with ``status``."""
        self.statuses[status] = self.statuses.get(status, 0) + 1


@dataclass(slots=True)
class RecordedRequest:
    """One request as the endpoint received it (kept when the app records requests).

    ``headers`` holds every header as sent, credentials included, so a test can check them;
    they stay out of the repr. ``body`` is the JSON-decoded body, the raw bytes when it was
    not JSON, or ``None`` when there was none (a GET). ``time`` is ``time.monotonic()`` when
    the body had arrived: compare two of them to see the wait between attempts.
    """

    method: str
    path: str
    """The URL path, e.g. ``"/"``; ``query`` holds the query parameters."""
    query: dict[str, str]
    headers: CIMultiDict[str] = field(repr=False)
    body: Any = field(repr=False)
    time: float
    scripted: Any = None
    """The script entry this POST consumed, or None when no script was playing."""
    status: int | None = None
    """The status the endpoint answered; None while it works, and when the client left first
    or the connection was dropped without a reply."""

    @property
    def prompt(self) -> str | None:
        """The body's ``"prompt"`` when the body is a JSON object with a string prompt."""
        if isinstance(self.body, dict):
            prompt = self.body.get("prompt")
            if isinstance(prompt, str):
                return prompt
        return None
