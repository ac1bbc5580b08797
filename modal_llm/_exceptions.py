"""Every error modal-llm raises, and the one helper that makes URLs safe to show.

The hierarchy::

    ModalLLMError                      .url (query and userinfo removed), .attempts
    ├── ConfigError(ValueError)        bad URL, key without secret, bad option or header
    ├── ClientClosedError(RuntimeError) the client was closed, or used from another loop
    ├── TransportError                 no usable response arrived
    │   ├── ConnectError               refused, reset, DNS, TLS, dropped before a reply
    │   ├── EndpointTimeoutError(TimeoutError)  .phase: connect|first_byte|read|deadline
    │   └── RedirectError              a redirect we must not or cannot follow
    │       └── ResultPendingError     303 hops ran out; .result_url resumes the poll
    ├── StatusError                    non-2xx reply: .status_code, .body_excerpt, .headers
    │   ├── AuthenticationError        401/403 (Modal's "missing credentials" body kept)
    │   ├── RateLimitError             429: .retry_after (seconds, or None)
    │   └── ServerError                5xx
    ├── ContractError                  the reply breaks the contract (not JSON, no "prompt")
    │   └── ReplyTooLargeError         the reply exceeded ``max_reply_bytes``
    └── StreamError                    a stream failed: .partial_text holds what arrived
        ├── StreamInterruptedError     dropped or ended without its terminator
        └── ServerStreamError          the server sent ``event: error`` or an error object

Retried by default: ``ConnectError``, ``EndpointTimeoutError`` (phases connect and
first_byte), and ``StatusError`` with a status in ``RetryPolicy.retry_statuses``.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "AuthenticationError",
    "ClientClosedError",
    "ConfigError",
    "ConnectError",
    "ContractError",
    "EndpointTimeoutError",
    "ModalLLMError",
    "RateLimitError",
    "RedirectError",
    "ReplyTooLargeError",
    "ResultPendingError",
    "ServerError",
    "ServerStreamError",
    "StatusError",
    "StreamError",
    "StreamInterruptedError",
    "TransportError",
    "redact_url",
]

BODY_EXCERPT_BYTES = 300
"""How much of an error body an exception keeps and shows."""

_SENSITIVE_HEADERS = frozenset(
    {"modal-key", "modal-secret", "authorization", "proxy-authorization", "cookie", "set-cookie"}
)


def redact_url(url: object) -> str:
    """Return ``url`` without userinfo and without its query string's values.

    Modal's result URLs carry ``__modal_function_call_id``; that id is kept because a
    caller needs it to resume a poll. Every other query value is masked.
    """
    text = str(url)
    try:
        parts = urlsplit(text)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError:
        return "<invalid url>"
    netloc = parts.hostname or ""
    if port is not None:
        netloc = f"{netloc}:{port}"
    query = ""
    if parts.query:
        kept = []
        for pair in parts.query.split("&"):
            name, sep, _ = pair.partition("=")
            kept.append(pair if name == "__modal_function_call_id" else f"{name}{sep}***")
        query = "&".join(kept)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Copy ``headers`` with credential values replaced by ``***``."""
    return {k: ("***" if k.lower() in _SENSITIVE_HEADERS else v) for k, v in headers.items()}


def excerpt(body: bytes | str, limit: int = BODY_EXCERPT_BYTES) -> str:
    """The first ``limit`` bytes of a body as one printable line."""
    raw = body.encode("utf-8", "replace") if isinstance(body, str) else body
    text = raw[:limit].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text + ("…" if len(raw) > limit else "")


class ModalLLMError(Exception):
    """Base class of every error modal-llm raises; catch it to handle them all."""

    def __init__(self, message: str, *, url: object = None, attempts: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url: str | None = None if url is None else redact_url(url)
        self.attempts = attempts

    def _where(self) -> str:
        parts = []
        if self.url:
            parts.append(f"from {self.url}")
        if self.attempts is not None and self.attempts > 1:
            parts.append(f"after {self.attempts} attempts")
        return " ".join(parts)

    def _detail(self) -> str:
        return ""

    def __str__(self) -> str:
        where = self._where()
        text = f"{self.message} {where}" if where else self.message
        detail = self._detail()
        return f"{text}: {detail}" if detail else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class ConfigError(ModalLLMError, ValueError):
    """An option or argument is invalid; raised before anything is sent."""


class ClientClosedError(ModalLLMError, RuntimeError):
    """The client was closed, or is being used from an event loop it does not belong to."""


class TransportError(ModalLLMError):
    """No usable HTTP response arrived."""


class ConnectError(TransportError):
    """The connection failed or dropped before a complete reply arrived.

    ``before_response`` is True when no response byte had arrived, which makes it safe
    to retry; a reply cut short after its headers is not retried.
    """

    def __init__(
        self,
        message: str,
        *,
        before_response: bool = True,
        url: object = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message, url=url, attempts=attempts)
        self.before_response = before_response


class EndpointTimeoutError(TransportError, TimeoutError):
    """A timeout fired; ``phase`` names which one (connect, first_byte, read, deadline)."""

    def __init__(
        self,
        message: str,
        *,
        phase: str,
        url: object = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message, url=url, attempts=attempts)
        self.phase = phase


class RedirectError(TransportError):
    """A redirect that must not or cannot be followed."""


class ResultPendingError(RedirectError):
    """Modal's 303 result-URL chain outlasted the hop limit or the deadline.

    The work is still running; poll ``result_url`` with ``AsyncClient.resume()``
    instead of sending the prompt again (which would pay for the work twice).
    """

    def __init__(
        self,
        message: str,
        *,
        result_url: str,
        hops: int,
        url: object = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message, url=url, attempts=attempts)
        self.result_url = result_url
        self.hops = hops

    def _detail(self) -> str:
        return f"resume(result_url) polls {redact_url(self.result_url)}"


class StatusError(ModalLLMError):
    """The endpoint answered with a non-2xx status.

    ``retry_after`` is the server's Retry-After hint in seconds, when it sent one.
    """

    def __init__(
        self,
        *,
        status_code: int,
        reason: str = "",
        body: bytes | str = b"",
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
        url: object = None,
        attempts: int | None = None,
    ) -> None:
        self.status_code = status_code
        self.retry_after = retry_after
        self.reason = reason
        self.body_excerpt = excerpt(body)
        self.headers: dict[str, str] = redact_headers(headers or {})
        super().__init__(f"{status_code} {reason}".strip(), url=url, attempts=attempts)

    def _detail(self) -> str:
        return self.body_excerpt


class AuthenticationError(StatusError):
    """401 or 403: missing or wrong ``Modal-Key``/``Modal-Secret``, or no access."""


class RateLimitError(StatusError):
    """429: the endpoint is saturated. ``retry_after`` is the server's hint in seconds."""

    def _detail(self) -> str:
        hint = "" if self.retry_after is None else f"(retry after {self.retry_after:g}s) "
        return hint + self.body_excerpt


class ServerError(StatusError):
    """A 5xx status: the endpoint or Modal's proxy failed."""


class ContractError(ModalLLMError):
    """The reply does not follow the contract: not JSON, not an object, bad ``"prompt"``."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body: bytes | str = b"",
        url: object = None,
        attempts: int | None = None,
    ) -> None:
        self.status_code = status_code
        self.body_excerpt = excerpt(body)
        if status_code is not None:
            message = f"{message} (status {status_code})"
        super().__init__(message, url=url, attempts=attempts)

    def _detail(self) -> str:
        return self.body_excerpt


class ReplyTooLargeError(ContractError):
    """The reply grew past ``max_reply_bytes``; the rest was not read."""


class StreamError(ModalLLMError):
    """A stream failed. ``partial_text`` holds the text that reached the caller."""

    def __init__(
        self,
        message: str,
        *,
        partial_text: str = "",
        url: object = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message, url=url, attempts=attempts)
        self.partial_text = partial_text


class StreamInterruptedError(StreamError):
    """The stream dropped, or ended without the terminator its format promised."""


class ServerStreamError(StreamError):
    """The server reported an error inside the stream; ``server_message`` holds it."""

    def __init__(
        self,
        message: str,
        *,
        server_message: str = "",
        partial_text: str = "",
        url: object = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message, partial_text=partial_text, url=url, attempts=attempts)
        self.server_message = server_message


def status_error_class(status_code: int) -> type[StatusError]:
    """The narrowest ``StatusError`` subclass for a status (the one place that maps them)."""
    if status_code in (401, 403):
        return AuthenticationError
    if status_code == 429:
        return RateLimitError
    if status_code >= 500:
        return ServerError
    return StatusError
