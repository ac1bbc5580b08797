"""The LangChain rows of issue 17 (the ``lc`` helper's): ``abatch`` driven by the config alone.

``mllm-langchain-config`` is ``Modal(endpoint_url=url)`` with every field at its default
and ``abatch(prompts, config={"max_concurrency": c})``: the config alone must get ``c``
requests in flight (issue 12.2). ``mllm-chat`` is the same for ``ChatModal``; each reply is
an ``AIMessage``, counted by its text. ``mllm-langchain-ascompleted`` and
``mllm-chat-ascompleted`` consume ``abatch_as_completed`` with the same config, keeping
only a count (a caller writing each result out as it comes). Registered in
``benchmarks._clients.CLIENTS``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from benchmarks._clients import AsyncRun


def _classes() -> Any:
    from benchmarks._clients import Unavailable, import_modal_llm

    import_modal_llm()
    try:
        import modal_llm.langchain as lc
    except ImportError as exc:
        raise Unavailable(f"modal_llm.langchain is not available: {exc}") from exc
    return lc


@contextlib.asynccontextmanager
async def open_langchain_config(url: str, concurrency: int) -> AsyncIterator[AsyncRun]:
    """``Modal(endpoint_url=url).abatch(prompts, config={"max_concurrency": c})``."""
    from benchmarks._clients import as_list, count_good

    llm = _classes().Modal(endpoint_url=url)

    async def run(prompts: Iterable[str]) -> int:
        return count_good(
            await llm.abatch(as_list(prompts), config={"max_concurrency": concurrency})
        )

    yield run


@contextlib.asynccontextmanager
async def open_chat(url: str, concurrency: int) -> AsyncIterator[AsyncRun]:
    """``ChatModal(endpoint_url=url).abatch(prompts, config={"max_concurrency": c})``."""
    from benchmarks._clients import Unavailable, as_list, count_good

    lc = _classes()
    chat_class = getattr(lc, "ChatModal", None)
    if chat_class is None:
        raise Unavailable("modal_llm.langchain.ChatModal is not available yet")
    chat = chat_class(endpoint_url=url)

    async def run(prompts: Iterable[str]) -> int:
        replies = await chat.abatch(as_list(prompts), config={"max_concurrency": concurrency})
        return count_good(getattr(reply, "text", None) for reply in replies)

    yield run


@contextlib.asynccontextmanager
async def open_ascompleted(url: str, concurrency: int, *, chat: bool) -> AsyncIterator[AsyncRun]:
    """``abatch_as_completed(prompts, config={"max_concurrency": c})`` of ``Modal`` or
    ``ChatModal(endpoint_url=url)``, counting good outputs and keeping none."""
    from benchmarks._clients import as_list

    lc = _classes()
    model = lc.ChatModal(endpoint_url=url) if chat else lc.Modal(endpoint_url=url)

    async def run(prompts: Iterable[str]) -> int:
        good = 0
        config = {"max_concurrency": concurrency}
        async for _, output in model.abatch_as_completed(as_list(prompts), config=config):
            text = output if isinstance(output, str) else getattr(output, "text", None)
            good += isinstance(text, str) and bool(text)
        return good

    yield run


def open_langchain_ascompleted(url: str, concurrency: int) -> Any:
    """``Modal(endpoint_url=url).abatch_as_completed(...)``, counted."""
    return open_ascompleted(url, concurrency, chat=False)


def open_chat_ascompleted(url: str, concurrency: int) -> Any:
    """``ChatModal(endpoint_url=url).abatch_as_completed(...)``, counted."""
    return open_ascompleted(url, concurrency, chat=True)
