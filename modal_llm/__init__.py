"""modal-llm: a fast, typed, asyncio-first client for LLM web endpoints on Modal.

Usage::

    from modal_llm import AsyncClient

    async with AsyncClient("https://me--llm-web.modal.run") as client:
        print(await client.generate("Identify yourself, bot!"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from ._fanout import BatchItem, BatchResult
from ._hooks import AttemptEvent, AttemptHook
from ._logs import setup_logging as _setup_logging
from ._pacing import AdaptiveConcurrency, RateLimiter
from ._retry import is_retryable
from ._run import run
from ._send import PoolStats
from ._streaming import TextStream
from ._sync import Client

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

_setup_logging()  # MODAL_LLM_LOG=info|debug, like OPENAI_LOG


def __getattr__(name: str) -> Any:
    # Served lazily so that importing the package never reads distribution metadata.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("modal-llm")
        except PackageNotFoundError:
            return "0.0.0+unknown"
    if name == "Completion":
        # Lazy: pydantic's model machinery loads with the first reply, not on import.
        from ._models import Completion

        return Completion
    raise AttributeError(f"module 'modal_llm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "Completion", "__version__"})
