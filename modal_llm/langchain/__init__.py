"""LangChain integration (the ``langchain`` extra): the ``Modal`` LLM and ``ChatModal``.

Both are backed by modal-llm's clients; see docs/langchain.md::

    from modal_llm.langchain import ChatModal, Modal

    llm = Modal(endpoint_url="https://me--llm-web.modal.run", model_kwargs={"max_tokens": 128})
    chat = ChatModal(endpoint_url="https://me--llm-web.modal.run", max_tokens=128)

All HTTP, retry, parsing and streaming work is done by ``AsyncClient`` (one per event loop)
and the blocking ``Client`` (for the sync methods); this package only bridges.
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "modal_llm.langchain needs langchain-core: pip install 'langchain-core>=1,<2' "
        "(or, in a checkout of modal-llm: pip install -e '.[langchain]')"
    ) from exc

from ._base import UnsupportedFeatureError
from ._chat import ChatModal
from ._llm import Modal

__all__ = ["ChatModal", "Modal", "UnsupportedFeatureError"]
