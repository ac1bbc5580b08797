"""One logical call: its ``Call`` state, how it is built from a method's arguments
(``CallFactory``), and the outcomes of one request (``Reply``, ``Redirect``)."""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import TYPE_CHECKING, Any, Final

from ._auth import credential_headers, secret_values
from ._config import TimeoutTypes, UseClientDefault, coerce_timeout, validate_headers
from ._exceptions import (
    ConfigError,
    EndpointTimeoutError,
    ModalLLMError,
    ResultPendingError,
)
from ._hooks import AttemptHook, CallHooks
from ._types import HeaderTypes
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    import aiohttp

    from ._config import ClientOptions

__all__ = ["ATTEMPT_HEADER", "Call", "CallFactory", "Redirect", "Reply", "deadline_error"]

STREAM_ACCEPT: Final = "text/event-stream, application/x-ndjson, text/plain, application/json"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
ATTEMPT_HEADER: Final = "X-Modal-LLM-Attempt"


_CALL_HEADERS: Final = {IDEMPOTENCY_HEADER: "", ATTEMPT_HEADER: "1"}
"""What every request of a call sends after the client's headers and its own: its
idempotency key (filled in per call) and attempt number (set per attempt by the send path)."""
_KEY_MASK: Final = (1 << 128) - 1


def _user_agent() -> str:
    return f"modal-llm/{__version__}"  # no importlib.metadata: ~10 ms off the first client


class Call:
    """One logical call's state, worked out once and shared by every attempt and hop.

    ``kind`` is ``"unary"``, ``"stream"`` or ``"resume"``; ``hops`` counts the redirects
    followed; ``sent`` counts the HTTP requests sent (every attempt of every hop);
    ``secrets`` are the credential values masked in every error the call raises.
    """

    __slots__ = (
        "aio_timeout",
        "body",
        "deadline_at",
        "first_byte",
        "first_piece_at",
        "headers",
        "hooks",
        "hops",
        "kind",
        "observer",
        "pool",
        "read_timeout",
        "result_url",
        "secrets",
        "sent",
    )

    def __init__(
        self,
        kind: str,
        body: bytes,
        headers: dict[str, str],
        aio_timeout: aiohttp.ClientTimeout,
        read_timeout: float | None,
        deadline_at: float | None,
        pool: float | None,
        secrets: tuple[str, ...],
        first_byte: float | None = None,
    ) -> None:
        self.kind = kind
        self.secrets = secrets
        self.body = body
        self.headers = headers
        self.aio_timeout = aio_timeout
        self.read_timeout = read_timeout
        self.deadline_at = deadline_at
        self.pool = pool
        self.first_byte = first_byte
        self.result_url: str | None = None
        self.first_piece_at: float | None = None  # loop time the first piece of a stream came
        self.hops = 0
        self.sent = 0
        self.hooks: CallHooks | None = None  # its AttemptEvent subscribers, if any
        # Its telemetry (a ``_otel.CallScope``), or for a stream a zero-argument function
        # that starts it when the stream opens; None when the client records nothing.
        self.observer: Any = None


class Reply:
    """A whole 2xx reply body."""

    __slots__ = ("body", "content_type", "status", "url")

    location = None

    def __init__(self, status: int, body: bytes, url: str, content_type: str | None = None) -> None:
        self.status = status
        self.body = body
        self.url = url
        self.content_type = content_type


class Redirect:
    """A redirect to follow (or refuse): its status and ``Location``."""

    __slots__ = ("location", "status", "url")

    def __init__(self, status: int, location: str, url: str) -> None:
        self.status = status
        self.location = location
        self.url = url


def deadline_expired(exc: BaseException) -> bool:
    """Whether ``exc``, caught as ``asyncio.TimeoutError`` around
    ``asyncio.wait_for(work, <time to the deadline>)``, is that wait's own expiry.

    Only then is it the deadline: ``EndpointTimeoutError``, ``PoolTimeoutError`` and
    aiohttp's ``ServerTimeoutError`` subclass the builtin ``TimeoutError``, which IS
    ``asyncio.TimeoutError`` on Python >= 3.11, so a phase timeout raised inside ``work``
    is caught there too and must pass through with its phase and attempts. ``wait_for``
    raises the exact class, never a subclass.
    """
    return type(exc) is asyncio.TimeoutError


def deadline_error(call: Call, endpoint_url: str) -> ModalLLMError:
    """What a call raises when ``Timeout.deadline`` passes: ``ResultPendingError`` once a
    result URL is known (the work goes on; resume it), else a deadline timeout."""
    if call.result_url is not None:
        return ResultPendingError(
            "the deadline passed while the result was still being computed",
            result_url=call.result_url,
            hops=call.hops,
            url=endpoint_url,
        )
    return EndpointTimeoutError("the call's deadline passed", phase="deadline", url=endpoint_url)


class CallFactory:
    """Builds each logical call of one client: body, headers, timeouts, hooks.

    Worked out once per client: the base headers (credentials included), the aiohttp
    timeouts of the default ``Timeout``, the credential values to mask, and a random
    prefix for idempotency keys.
    """

    __slots__ = (
        "_aio_stream_timeout",
        "_aio_timeout",
        "_attempt_hooks",
        "_failure_hooks",
        "_headers",
        "_json_error",
        "_key_base",
        "_key_counter",
        "_options",
        "_stream_call_headers",
        "_stream_headers",
        "_to_json",
        "_unary_call_headers",
        "secrets",
    )

    def __init__(self, options: ClientOptions) -> None:
        # pydantic-core loads with the first client, not on ``import modal_llm`` (~9 ms).
        from pydantic_core import PydanticSerializationError, to_json

        self._to_json: Callable[[Any], bytes] = to_json
        self._json_error: type[Exception] = PydanticSerializationError
        self._options = options
        self._aio_timeout = options.timeout.to_aiohttp(streaming=False)
        self._aio_stream_timeout = options.timeout.to_aiohttp(streaming=True)
        base = {"Content-Type": "application/json", "User-Agent": _user_agent()}
        base.update(options.headers)
        base.update(credential_headers(options.modal_key, options.modal_secret))
        self._headers = base
        self._stream_headers = {**base, "Accept": STREAM_ACCEPT}
        # A call's headers without headers of its own: a copy of one of these, with its
        # idempotency key filled in.
        self._unary_call_headers = {**base, **_CALL_HEADERS}
        self._stream_call_headers = {**self._stream_headers, **_CALL_HEADERS}
        # What we send that may be a credential, masked in every error and every exported
        # text in case a server echoes it back (headers, the URL's query and userinfo).
        self.secrets = secret_values(base, options.endpoint_url)
        self._attempt_hooks = options.event_hooks.get("attempt", ())
        self._failure_hooks = options.event_hooks.get("failure", ())
        # Idempotency keys: 32 hex digits, a random per-client prefix of 24 and a counter of
        # 8 (past 2**32 calls it carries into the prefix: keys stay unique), no syscall.
        self._key_base = int.from_bytes(os.urandom(12), "big") << 32
        self._key_counter = itertools.count()

    @property
    def aio_timeout(self) -> aiohttp.ClientTimeout:
        """The session's default aiohttp timeout."""
        return self._aio_timeout

    def request(
        self,
        prompt: str,
        headers: HeaderTypes,
        timeout: TimeoutTypes | UseClientDefault,
        extra: dict[str, Any],
        on_attempt: AttemptHook | None,
        *,
        streaming: bool = False,
    ) -> Call:
        """A call that POSTs ``prompt``: a unary call, or a stream's."""
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a str, not {type(prompt).__name__}")
        payload: dict[str, Any] = {"prompt": prompt, **extra} if extra else {"prompt": prompt}
        flag = self._options.stream_flag
        if streaming and flag is not None:
            payload[flag] = True
        try:
            body = self._to_json(payload)
        except self._json_error as exc:
            raise ConfigError(f"model arguments are not JSON-serializable: {exc}") from None
        kind = "stream" if streaming else "unary"
        if not headers:
            own = self._stream_call_headers if streaming else self._unary_call_headers
            return self.new(kind, body, own, timeout, on_attempt)
        base = self._stream_headers if streaming else self._headers
        extra_headers = validate_headers(headers)
        call = self.new(kind, body, {**base, **extra_headers, **_CALL_HEADERS}, timeout, on_attempt)
        for name in extra_headers:  # the caller's own key for this call: kept for every attempt
            if name.lower() == "idempotency-key" and name != IDEMPOTENCY_HEADER:
                call.headers[IDEMPOTENCY_HEADER] = call.headers.pop(name)
            elif name == IDEMPOTENCY_HEADER:
                call.headers[IDEMPOTENCY_HEADER] = extra_headers[name]
        more = secret_values(extra_headers, "")
        if more:  # this call's own credential-like headers are masked too
            call.secrets = tuple(sorted({*call.secrets, *more}, key=len, reverse=True))
        return call

    def resume(self, timeout: TimeoutTypes | UseClientDefault) -> Call:
        """A call that only polls a result URL."""
        return self.new("resume", b"", self._unary_call_headers, timeout, None)

    def new(
        self,
        kind: str,
        body: bytes,
        headers: dict[str, str],
        timeout: TimeoutTypes | UseClientDefault,
        on_attempt: AttemptHook | None,
    ) -> Call:
        """A call sending ``headers`` (which end with ``_CALL_HEADERS``), its idempotency key
        filled in."""
        streaming = kind == "stream"
        call_headers = headers.copy()
        key = (self._key_base + next(self._key_counter)) & _KEY_MASK
        call_headers[IDEMPOTENCY_HEADER] = key.to_bytes(16, "big").hex()
        if isinstance(timeout, UseClientDefault):
            parts = self._options.timeout
            aio_timeout = self._aio_stream_timeout if streaming else self._aio_timeout
        else:
            parts = coerce_timeout(timeout)
            aio_timeout = parts.to_aiohttp(streaming=streaming)
        deadline_at = None
        if parts.deadline is not None:
            deadline_at = asyncio.get_running_loop().time() + parts.deadline
        read = parts.read
        if streaming:
            if read == parts.first_byte:
                read = None  # sock_read already holds that value
            first_byte = None  # sock_read bounds the wait for a stream's headers
        else:
            # Unary: the first byte is watched by FirstByteWatch, not by a timer per request.
            first_byte = parts.first_byte
        call = Call(
            kind,
            body,
            call_headers,
            aio_timeout,
            read,
            deadline_at,
            parts.pool,
            self.secrets,
            first_byte,
        )
        if on_attempt is not None:
            attempt = (*self._attempt_hooks, on_attempt)
            call.hooks = CallHooks(attempt, self._failure_hooks, stream=streaming)
        elif self._attempt_hooks or self._failure_hooks:
            call.hooks = CallHooks(self._attempt_hooks, self._failure_hooks, stream=streaming)
        return call
