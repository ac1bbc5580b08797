"""Every error modal-llm raises, and the one helper that makes URLs safe to show.

The hierarchy::

    ModalLLMError                      .url (query and userinfo removed), .attempts
    ├── ConfigError(ValueError)        bad URL, key without secret, bad option or header
    ├── ClientClosedError(RuntimeError) the client was closed, or used from another loop
    ├── PoolTimeoutError(TimeoutError)  every concurrency slot stayed held for Timeout.pool
    ├── TransportError                 no usable response arrived
    │   ├── ConnectError               refused, reset, DNS, TLS, dropped before a reply
    │   ├── EndpointTimeoutError(TimeoutError)  .phase: connect|first_byte|read|deadline
    │   └── RedirectError              a redirect we must not or cannot follow
    │       └── ResultPendingError     303 hops ran out; .result_url resumes the poll
    ├── StatusError                    non-2xx reply: .status_code, .body_excerpt, .headers,
    │   │                              .retry_after (seconds, or None)
    │   ├── AuthenticationError        401/403 (Modal's "missing credentials" body kept)
    │   ├── RateLimitError             429
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

from collections.abc import Iterable, Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from ._auth import CREDENTIAL_HEADERS

__all__ = [
    "AuthenticationError",
    "ClientClosedError",
    "ConfigError",
    "ConnectError",
    "ContractError",
    "EndpointTimeoutError",
    "ModalLLMError",
    "PoolTimeoutError",
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
    if ":" in netloc:
        netloc = f"[{netloc}]"  # an IPv6 literal keeps its brackets
    if port is not None:
        netloc = f"{netloc}:{port}"
    query = ""
    if parts.query:
        kept = []
        for pair in parts.query.split("&"):
            name, sep, _ = pair.partition("=")
            if name == "__modal_function_call_id" or not pair:
                kept.append(pair)
            else:  # a bare "?token" item is a value: masked whole
                kept.append(f"{name}=***" if sep else "***")
        query = "&".join(kept)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class Headers(dict[str, str]):
    """Reply headers as ``StatusError.headers`` holds them: read-only, case-insensitive.

    ``h["retry-after"]`` finds ``Retry-After``. Still a ``dict`` (``json.dumps`` and
    ``dict(h)`` work, keys keep the server's spelling); a repeated header's values are
    joined with ``", "`` (RFC 9110 5.3). Changing it raises ``TypeError``.
    """

    __slots__ = ("_lower",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        merged: dict[str, str] = {}
        lower: dict[str, str] = {}
        for name, value in items:
            key = lower.setdefault(name.lower(), name)
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        super().__init__(merged)
        self._lower = lower

    def _key(self, name: str) -> str:
        return self._lower.get(name.lower(), name) if isinstance(name, str) else name

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(self._key(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(self._key(name))

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(self._key(name), default)

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("StatusError.headers is read-only")

    __setitem__ = __delitem__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only
    __ior__ = _read_only

    def __reduce__(self) -> tuple[Any, ...]:
        return (Headers, (list(self.items()),))

    def __repr__(self) -> str:
        return f"Headers({dict.__repr__(self)})"


def redact_headers(headers: Mapping[str, str]) -> Headers:
    """A read-only, case-insensitive copy of ``headers``, credential values as ``***``."""
    return Headers((k, "***" if k.lower() in CREDENTIAL_HEADERS else v) for k, v in headers.items())


def mask_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``.

    Also masks a secret as ``excerpt`` shows it (whitespace runs collapsed) and the start of
    a secret cut off by an excerpt's closing ``…``.
    """
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
        collapsed = " ".join(secret.split())
        if collapsed != secret and collapsed and collapsed in text:
            text = text.replace(collapsed, "***")
        if text.endswith("…"):
            head = text[:-1]
            for size in range(len(collapsed) - 1, min(3, len(collapsed) - 1), -1):
                if head.endswith(collapsed[:size]):
                    text = head[:-size] + "***…"
                    break
    return text


def mask_error(error: BaseException, secrets: tuple[str, ...]) -> None:
    """Mask ``secrets`` in every text an error carries, its causes' included (in place).

    The one place an error leaving the client is cleaned, whatever path raised it: the
    message, ``args``, every string attribute (``body_excerpt``, ``server_message``...)
    and the values of ``headers``, so neither ``str()``, ``repr()`` nor an attribute
    shows them. Not ``partial_text``: it is the text the caller was already handed,
    piece by piece, and a salvaged text must never differ from it.
    """
    if not secrets:
        return
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModalLLMError):
            state = current.__dict__
            for name, value in state.items():
                if name == "partial_text":
                    continue
                if isinstance(value, str) and value:
                    state[name] = mask_text(value, secrets)
                elif isinstance(value, Headers):  # a reply header echoing what we sent
                    state[name] = Headers((k, mask_text(v, secrets)) for k, v in value.items())
            current.args = tuple(
                mask_text(a, secrets) if isinstance(a, str) else a for a in current.args
            )
        current = current.__cause__ or current.__context__


# Code points that must not reach a terminal or a log line as they are: C0 and C1 controls
# and DEL (ESC starts a terminal's escape sequences: a server's error body could set the
# window title, erase the line or hide text), and the Unicode format characters that
# reorder or break a line (bidi overrides and isolates, the line and paragraph
# separators; Trojan Source, CVE-2021-42574). Each becomes a visible escape such as ``\x1b``.
_UNPRINTABLE = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {
    code: f"\\u{code:04x}"
    for code in (
        0x061C,
        0x200E,
        0x200F,
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    )
}


def printable(text: str) -> str:
    """``text`` with every control and line-breaking format character escaped (``\\x1b``)."""
    return text.translate(_UNPRINTABLE)


def excerpt(body: bytes | str, limit: int = BODY_EXCERPT_BYTES) -> str:
    """The first ``limit`` bytes of a body as one printable line: runs of whitespace become
    one space and other control characters are escaped (see :func:`printable`)."""
    raw = body.encode("utf-8", "replace") if isinstance(body, str) else body
    text = raw[:limit].decode("utf-8", "replace")
    text = printable(" ".join(text.split()))
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
        # One printable line whatever a server put in the parts (a reason phrase, a header).
        return printable(f"{text}: {detail}" if detail else text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructors cannot be rebuilt from ``args``: restore the state.
        return (_restore, (type(self), self.args, dict(self.__dict__)))


def _restore(cls: type[ModalLLMError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigError(ModalLLMError, ValueError):
    """An option or argument is invalid; raised before anything is sent."""


class ClientClosedError(ModalLLMError, RuntimeError):
    """The client was closed, or is being used from an event loop it does not belong to."""


class PoolTimeoutError(ModalLLMError, TimeoutError):
    """No concurrency slot came free within ``Timeout.pool`` seconds.

    ``slots`` is the client's ``max_concurrency`` (all of them were held) and ``timeout``
    the pool timeout that ran out. Never retried: the endpoint was not asked anything.
    A stream left open (not closed, not read to its end) holds its slot until closed.
    """

    def __init__(
        self,
        message: str,
        *,
        slots: int,
        timeout: float,
        url: object = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message, url=url, attempts=attempts)
        self.slots = slots
        self.timeout = timeout


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

    ``retry_after`` is the server's ``Retry-After`` (or ``retry-after-ms``) hint in seconds,
    read on every status, ``None`` when absent or unreadable. ``headers`` is a read-only,
    case-insensitive mapping (``err.headers["retry-after"]`` finds ``Retry-After``) with
    credential values shown as ``***``.
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
        self.reason = reason = printable(reason)
        self.body_excerpt = excerpt(body)
        self.headers: Headers = redact_headers(headers or {})
        super().__init__(f"{status_code} {reason}".strip(), url=url, attempts=attempts)

    def _detail(self) -> str:
        # One rule for every status: the server's Retry-After hint is shown when it sent one
        # (also when it was over ``max_retry_after`` and so not waited for).
        hint = "" if self.retry_after is None else f"(retry after {self.retry_after:g}s) "
        return hint + self.body_excerpt


class AuthenticationError(StatusError):
    """401 or 403: missing or wrong ``Modal-Key``/``Modal-Secret``, or no access."""


class RateLimitError(StatusError):
    """429: the endpoint is saturated. ``retry_after`` is the server's hint in seconds."""


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
    """The stream dropped, stalled, or ended without the terminator its format promised.

    ``ended_by`` says what ended it: ``"connection"`` (closed or reset mid-body),
    ``"timeout"`` (silent longer than ``Timeout.read``, or the deadline passed), ``"eof"``
    (the body ended cleanly but unfinished: no ``[DONE]``, or in the middle of a line),
    ``"client"`` (the client was closed).
    """

    def __init__(
        self,
        message: str,
        *,
        partial_text: str = "",
        ended_by: str = "eof",
        url: object = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message, partial_text=partial_text, url=url, attempts=attempts)
        self.ended_by = ended_by


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
