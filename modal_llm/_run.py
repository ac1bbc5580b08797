"""``run()``: ``asyncio.run`` on uvloop when it is installed (the ``speed`` extra)."""

from __future__ import annotations

import asyncio
import os
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
    ``True`` requires it; ``False`` never uses it.
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
            result: T = _uvloop.run(coro)
            return result
    return asyncio.run(coro)
