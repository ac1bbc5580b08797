"""Ctrl-C and SIGTERM, handled one way for every ``modal-llm`` command.

SIGTERM (``kill``, ``timeout``, a container stop) is handled as Ctrl-C is: inside the event
loop it cancels the command's main task, as ``asyncio.run`` does for Ctrl-C, so the command
unwinds through its ``finally`` blocks (a stream ends its partial line, a batch flushes
OUTPUT); outside the loop it raises :class:`Terminated` where the program is. Either way the
command ends with one ``modal-llm: interrupted by ...`` line and exit status 143 (130 for
Ctrl-C); ``batch`` adds what is in OUTPUT and how to resume.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from types import FrameType, TracebackType
from typing import Any, TypeVar

from .._run import run
from .common import EXIT_INTERRUPTED, EXIT_TERMINATED

__all__ = ["Interrupts", "Terminated", "interruption"]

T = TypeVar("T")


class Terminated(BaseException):
    """SIGTERM arrived; raised where the program was, as ``KeyboardInterrupt`` is for Ctrl-C."""


def interruption(exc: BaseException) -> tuple[str, int]:
    """``(what interrupted, exit status)`` for ``Terminated`` or ``KeyboardInterrupt``."""
    if isinstance(exc, Terminated):
        return "SIGTERM", EXIT_TERMINATED
    return "Ctrl-C", EXIT_INTERRUPTED


class Interrupts:
    """While entered (in the main thread), SIGTERM is handled as Ctrl-C is.

    Usage::

        with Interrupts() as interrupts:
            interrupts.run(command(args))   # SIGTERM -> Terminated, after the task unwound
    """

    def __init__(self) -> None:
        self.sigterm = False
        self._previous: Any = None
        self._installed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None

    def __enter__(self) -> Interrupts:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        except ValueError:  # not the main thread (tests call main() in a thread)
            pass
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.sigterm = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not task.done():
            loop.call_soon_threadsafe(task.cancel)
        else:
            raise Terminated

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """``modal_llm.run(coro)``; SIGTERM cancels it, then raises :class:`Terminated`."""

        async def main() -> T:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            try:
                return await coro
            finally:
                self._loop = self._task = None

        try:
            result = run(main())
        except asyncio.CancelledError:
            if not self.sigterm:
                raise
            raise Terminated from None
        if self.sigterm:  # the command finished anyway; it was still asked to stop
            raise Terminated
        return result
