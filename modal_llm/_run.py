"""``run()``: ``asyncio.run`` on uvloop when it is installed (the ``speed`` extra)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

__all__ = ["run"]

ENV_NO_UVLOOP: Final = "MODAL_LLM_NO_UVLOOP"

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], *, uvloop: bool | None = None) -> T:
    """Run ``coro`` to completion on a new event loop, uvloop's when available.

    Usage::

        import modal_llm

        async def main() -> None:
            async with modal_llm.AsyncClient(url) as client:
                ...

        modal_llm.run(main())          # uvloop if installed (pip install uvloop)

    ``uvloop=None`` uses it when importable unless ``MODAL_LLM_NO_UVLOOP`` is set;
    ``True`` requires it; ``False`` never uses it. Ctrl-C cancels ``coro`` and raises
    ``KeyboardInterrupt`` once it has unwound, as ``asyncio.run`` does since Python 3.11
    (on 3.10 too).
    """
    if uvloop is None:
        uvloop = not os.environ.get(ENV_NO_UVLOOP)
        required = False
    else:
        required = uvloop
    if uvloop:
        try:
            import uvloop as _uvloop
        except ImportError:
            if required:
                raise
        else:
            result: T = _uvloop.run(_main(coro))
            return result
    return asyncio.run(_main(coro))


def _main(coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
    if sys.version_info >= (3, 11) or sys.platform == "win32":
        return coro  # asyncio.run cancels the main task on Ctrl-C itself (3.11+)
    return _cancel_on_ctrl_c(coro)


async def _cancel_on_ctrl_c(coro: Coroutine[Any, Any, T]) -> T:
    """Python 3.10: Ctrl-C cancels the main task, as ``asyncio.run`` does since 3.11.

    Before 3.11 Ctrl-C raised ``KeyboardInterrupt`` wherever the loop happened to be, often
    in a transport's callback (aiohttp's ``data_received``): the running code never saw a
    cancellation, so no ``finally`` of the program ran in order (a stream's partial line, a
    batch's flush), and the transport logged a fatal error. Now the first Ctrl-C cancels the
    task and ``KeyboardInterrupt`` is raised once it has unwound; a second one raises at once.
    Left alone outside the main thread or under a SIGINT handler of the program's own.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        return await coro
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    interrupted = False

    def on_ctrl_c() -> None:
        nonlocal interrupted
        if interrupted or task is None or task.done():
            raise KeyboardInterrupt
        interrupted = True
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_ctrl_c)
    try:
        return await coro
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
