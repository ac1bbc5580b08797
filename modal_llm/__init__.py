"""modal-llm: a fast, typed, asyncio-first client for LLM web endpoints on Modal.

Usage::

    from modal_llm import AsyncClient

    async with AsyncClient("https://me--llm-web.modal.run") as client:
        print(await client.generate("Identify yourself, bot!"))
"""

from __future__ import annotations

from importlib import import_module as _import_module
from typing import TYPE_CHECKING, Any

from ._batch import BatchItem, BatchResult
from ._client import AsyncClient
from ._config import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_REDIRECTS,
    DEFAULT_MAX_REPLY_BYTES,
    DEFAULT_MAX_RETRIES,
    DEFAULT_RETRY_STATUSES,
    DEFAULT_TIMEOUT,
    USE_CLIENT_DEFAULT,
    ClientOptions,
    RetryPolicy,
    Timeout,
    UseClientDefault,
)
from ._exceptions import (
    AuthenticationError,
    ClientClosedError,
    ConfigError,
    ConnectError,
    ContractError,
    EndpointTimeoutError,
    ModalLLMError,
    PoolTimeoutError,
    RateLimitError,
    RedirectError,
    ReplyTooLargeError,
    ResultPendingError,
    ServerError,
    ServerStreamError,
    StatusError,
    StreamError,
    StreamInterruptedError,
    TransportError,
)
from ._hooks import AttemptEvent, AttemptHook
from ._logs import setup_logging as _setup_logging
from ._pacing import AdaptiveConcurrency, RateLimiter
from ._retry import is_retryable
from ._run import run
from ._send import PoolStats
from ._version import __version__ as __version__

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_MAX_REDIRECTS",
    "DEFAULT_MAX_REPLY_BYTES",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_RETRY_STATUSES",
    "DEFAULT_TIMEOUT",
    "USE_CLIENT_DEFAULT",
    "AdaptiveConcurrency",
    "AsyncClient",
    "AttemptEvent",
    "AttemptHook",
    "AuthenticationError",
    "BatchItem",
    "BatchResult",
    "Client",
    "ClientClosedError",
    "ClientOptions",
    "Completion",
    "ConfigError",
    "ConnectError",
    "ContractError",
    "EndpointTimeoutError",
    "ModalLLMError",
    "PoolStats",
    "PoolTimeoutError",
    "RateLimitError",
    "RateLimiter",
    "RedirectError",
    "ReplyTooLargeError",
    "ResultPendingError",
    "RetryPolicy",
    "ServerError",
    "ServerStreamError",
    "StatusError",
    "StreamError",
    "StreamInterruptedError",
    "TextStream",
    "Timeout",
    "TransportError",
    "UseClientDefault",
    "is_retryable",
    "run",
]


if TYPE_CHECKING:
    from ._models import Completion
    from ._streaming import TextStream
    from ._sync import Client

_setup_logging()  # MODAL_LLM_LOG=info|debug, like OPENAI_LOG

# Public names whose modules load on first use, not on ``import modal_llm`` (PEP 562):
# pydantic's model machinery with the first reply, the blocking Client's event-loop thread
# with the first Client, the stream machinery with the first stream.
_LAZY: dict[str, str] = {"Client": "_sync", "Completion": "_models", "TextStream": "_streaming"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(_import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'modal_llm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
