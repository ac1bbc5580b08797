"""``AsyncClient``: the one implementation of the wire contract.

Everything that touches HTTP lives here: the pooled aiohttp session and its lifecycle,
the concurrency slots, per-phase timeouts, Modal's 303 result-URL chain, retries (through
``_retry``), streaming (through ``_decoders``) and the translation of aiohttp's errors
into ours (``_ErrorMap``, the only place that catches aiohttp exceptions).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import warnings
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TypeVar, overload
from urllib.parse import urljoin

import aiohttp
from pydantic_core import PydanticSerializationError, to_json

from ._auth import CREDENTIAL_HEADERS, credential_headers, same_origin, strip_credentials
from ._batch import gather_bounded
from ._config import (
    DNS_CACHE_TTL,
    KEEPALIVE_TIMEOUT,
    USE_CLIENT_DEFAULT,
    ClientOptions,
    ClientSettings,
    TimeoutTypes,
    UseClientDefault,
    coerce_timeout,
    validate_headers,
)
from ._decoders import StreamDecoder, decoder_for
from ._exceptions import (
    ClientClosedError,
    ConfigError,
    ConnectError,
    ContractError,
    EndpointTimeoutError,
    ModalLLMError,
    RedirectError,
    ReplyTooLargeError,
    ResultPendingError,
    ServerStreamError,
    StreamError,
    StreamInterruptedError,
    TransportError,
    excerpt,
    redact_url,
    status_error_class,
)
from ._fanout import (
    AdaptiveConcurrency,
    AttemptObserver,
    BatchItem,
    BatchResult,
    FanOutPlan,
    ProgressCallback,
    PromptLike,
    RateLimiter,
    fan_out,
)
from ._retry import is_retryable, parse_retry_after, retry_call
from ._stop import StopMatcher, normalize_stop
from ._types import HeaderTypes, StopTypes
from ._watch import FirstByteWatch

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._models import Completion

__all__ = ["AsyncClient"]

log = logging.getLogger("modal_llm")

T = TypeVar("T")

STREAM_ACCEPT: Final = "text/event-stream, application/x-ndjson, text/plain, application/json"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
ATTEMPT_HEADER: Final = "X-Modal-LLM-Attempt"
_FOLLOWED_REDIRECTS: Final = frozenset({301, 302, 303})
_REFUSED_REDIRECTS: Final = frozenset({307, 308})
_ERROR_BODY_LIMIT: Final = 64 * 1024


def _user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"modal-llm/{version('modal-llm')}"
    except PackageNotFoundError:  # running from a source tree
        return "modal-llm"


class _State(enum.Enum):
    UNOPENED = 1  # no session yet: it is created inside the first running loop that uses us
    OPENED = 2  # a session exists and belongs to ``_loop``
    CLOSED = 3  # aclose() ran; the client cannot be reopened


class _Call:
    """Per logical call state, worked out once and shared by every attempt and hop."""

    __slots__ = (
        "aio_timeout",
        "body",
        "deadline_at",
        "first_byte",
        "headers",
        "on_attempt",
        "read_timeout",
        "result_url",
    )

    def __init__(
        self,
        body: bytes,
        headers: dict[str, str],
        aio_timeout: aiohttp.ClientTimeout,
        read_timeout: float | None,
        deadline_at: float | None,
        first_byte: float | None = None,
    ) -> None:
        self.first_byte = first_byte
        self.body = body
        self.headers = headers
        self.aio_timeout = aio_timeout
        self.read_timeout = read_timeout
        self.deadline_at = deadline_at
        self.result_url: str | None = None
        self.on_attempt: AttemptObserver | None = None


class _FailedAttempt(NamedTuple):
    """Stand-in for the send path's ``AttemptEvent`` (#10), which will replace it."""

    error: ModalLLMError


class _Reply:
    """One HTTP exchange's outcome: a 2xx body, or a redirect to follow."""

    __slots__ = ("body", "location", "status", "url")

    def __init__(self, status: int, body: bytes, location: str | None, url: str) -> None:
        self.status = status
        self.body = body
        self.location = location
        self.url = url


class _ErrorMap:
    """Translate aiohttp and socket errors raised inside ``with`` into ours.

    ``got_headers`` tells a first-byte timeout from a read timeout, and a drop before
    any response (safe to retry) from a reply cut short.
    """

    __slots__ = ("client", "got_headers", "url")

    def __init__(self, client: AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.got_headers = False

    def __enter__(self) -> _ErrorMap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, (ModalLLMError, asyncio.CancelledError)):
            return
        if not isinstance(exc, (aiohttp.ClientError, OSError, asyncio.TimeoutError, RuntimeError)):
            return
        raise self.translate(exc) from exc

    def translate(self, exc: BaseException) -> ModalLLMError:
        url = self.url
        if self.client._state is _State.CLOSED:
            return ClientClosedError("the client was closed while this call was running", url=url)
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return EndpointTimeoutError("timed out connecting", phase="connect", url=url)
        if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
            if self.got_headers:
                return EndpointTimeoutError(
                    "timed out reading the reply body", phase="read", url=url
                )
            return EndpointTimeoutError(
                "timed out waiting for the first byte of the reply", phase="first_byte", url=url
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            return ConnectError(f"cannot connect: {exc.os_error or exc}", url=url)
        if isinstance(exc, aiohttp.InvalidURL):
            if url != self.client._url:  # a Location the server sent, not the caller's URL
                return RedirectError("redirect to an invalid URL", url=self.client._url)
            return ConfigError(f"invalid URL: {exc}", url=url)
        if isinstance(exc, aiohttp.ClientPayloadError):
            return ConnectError(
                f"reply cut short: {_first_line(exc)}", before_response=False, url=url
            )
        if isinstance(exc, (aiohttp.ClientConnectionError, OSError)):
            where = "after the reply started" if self.got_headers else "before any reply"
            return ConnectError(
                f"connection lost {where}: {_first_line(exc) or type(exc).__name__}",
                before_response=not self.got_headers,
                url=url,
            )
        if isinstance(exc, aiohttp.ClientResponseError):
            return ConnectError(
                f"malformed HTTP reply: {_first_line(exc)}", before_response=False, url=url
            )
        if isinstance(exc, RuntimeError) and "closed" in str(exc).lower():
            return ClientClosedError(f"session closed: {exc}", url=url)
        if isinstance(exc, RuntimeError):
            raise exc
        return TransportError(f"{type(exc).__name__}: {_first_line(exc)}", url=url)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


class AsyncClient:
    """An asyncio client for a Modal LLM web endpoint, with one pooled connection set.

    Usage::

        async with AsyncClient("https://me--llm-web.modal.run") as client:
            text = await client.generate("Identify yourself, bot!", max_tokens=64)
            async for piece in client.stream("Tell me a story", stop=["\\n\\n"]):
                print(piece, end="")
            texts = await client.generate_many(prompts, return_exceptions=True)

    Options (all keyword-only; see docs/configuration.md): ``modal_key``/``modal_secret``
    (or ``MODAL_LLM_KEY``/``MODAL_LLM_SECRET``), ``headers``, ``max_concurrency``,
    ``max_retries``, ``timeout`` (seconds or a ``Timeout``), ``retry`` (a ``RetryPolicy``),
    ``max_redirects``, ``max_reply_bytes``, ``stream_flag``, ``stream_require_done``,
    ``connection_limit``. The URL falls back to ``MODAL_LLM_ENDPOINT_URL``.
    """

    _state = _State.CLOSED  # so __del__ is quiet if __init__ failed before setting it
    _session: aiohttp.ClientSession | None = None

    def __init__(self, endpoint_url: str | None = None, **options: Unpack[ClientSettings]) -> None:
        self._init(ClientOptions.build(endpoint_url, **options))

    @classmethod
    def from_options(cls, options: ClientOptions) -> AsyncClient:
        """Build a client from already resolved options (used by the blocking ``Client``)."""
        self = cls.__new__(cls)
        self._init(options)
        return self

    def _init(self, options: ClientOptions) -> None:
        self._options = options
        self._url = options.endpoint_url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slot: asyncio.Semaphore | None = None
        self._watch: FirstByteWatch | None = None
        self._aio_timeout = options.timeout.to_aiohttp(streaming=False)
        self._aio_stream_timeout = options.timeout.to_aiohttp(streaming=True)
        self._credentials = credential_headers(options.modal_key, options.modal_secret)
        base = {"Content-Type": "application/json", "User-Agent": _user_agent()}
        base.update(options.headers)
        base.update(self._credentials)
        self._headers = base
        self._stream_headers = {**base, "Accept": STREAM_ACCEPT}
        # Our credential values, masked in error bodies in case a server echoes them back.
        self._secrets = tuple(
            v.encode() for k, v in base.items() if k.lower() in CREDENTIAL_HEADERS and v
        )
        self._failure_listeners: list[Callable[[ModalLLMError], None]] = []
        self._key_prefix = os.urandom(12).hex()
        self._key_counter = itertools.count()
        self._state = _State.UNOPENED

    @property
    def options(self) -> ClientOptions:
        """The resolved settings (credentials are hidden in its repr)."""
        return self._options

    @property
    def endpoint_url(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"<AsyncClient {redact_url(self._url)} {self._state.name.lower()}>"

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        self._session_for_loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent; the client cannot be used afterwards."""
        session, self._session = self._session, None
        self._state = _State.CLOSED
        if session is not None and not session.closed:
            await session.close()

    def __del__(self, _warnings: Any = warnings) -> None:
        # Never do I/O here: the loop may be closed. Just tell the user about the leak.
        if self._state is _State.OPENED and self._session is not None:
            _warnings.warn(
                f"AsyncClient for {redact_url(self._url)} was not closed; "
                "use 'async with AsyncClient(...)' or 'await client.aclose()'",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    def _session_for_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is not None and self._loop is loop:
            return session
        if self._state is _State.CLOSED:
            raise ClientClosedError("Cannot use a closed client; create a new one.")
        if session is not None:
            raise ClientClosedError(
                "this AsyncClient belongs to another event loop; create one client per loop "
                "(or use modal_llm.Client from synchronous code)"
            )
        opts = self._options
        connector = aiohttp.TCPConnector(
            limit=opts.connection_limit,
            limit_per_host=opts.connection_limit,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            ttl_dns_cache=DNS_CACHE_TTL,
        )
        self._session = session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._aio_timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._slot = asyncio.Semaphore(opts.max_concurrency)
        self._watch = FirstByteWatch(loop)
        self._loop = loop
        self._state = _State.OPENED
        return session

    # -- public calls ----------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        *,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> str:
        """Send ``prompt`` (with ``extra`` as model arguments) and return the generated text.

        ``stop`` cuts the text at the first stop sequence, on the client. ``headers`` and
        ``timeout`` apply to this call only (for example ``Modal-Routing-Affinity-Key``).
        """
        completion, _ = await self._complete(prompt, headers, timeout, extra)
        if stop is None:
            return completion.prompt
        return StopMatcher(normalize_stop(stop)).apply(completion.prompt)

    async def complete(
        self,
        prompt: str,
        *,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> Completion:
        """Like ``generate`` but return the whole reply: ``.text`` and ``.data`` (all keys)."""
        completion, _ = await self._complete(prompt, headers, timeout, extra)
        return completion

    async def resume(
        self,
        result_url: str,
        *,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Completion:
        """Keep polling a Modal result URL (from ``ResultPendingError.result_url``).

        This never sends the prompt again, so the work is paid for once.
        """
        self._session_for_loop()
        call = self._new_call(b"", self._headers, timeout)
        reply = _Reply(303, b"", result_url, self._url)
        reply = await self._follow(reply, call)
        return self._parse(reply)

    @overload
    async def generate_many(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: Literal[False] = False,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> list[str]: ...

    @overload
    async def generate_many(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: Literal[True],
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> list[str | ModalLLMError]: ...

    async def generate_many(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: bool = False,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> list[str] | list[str | ModalLLMError]:
        """Generate for every prompt concurrently (under ``max_concurrency``), in input order.

        With ``return_exceptions=True`` a failing prompt's slot holds its ``ModalLLMError``
        and every other prompt still completes; otherwise the first error is raised and
        the remaining calls are cancelled.
        """
        self._session_for_loop()

        async def one(prompt: str) -> str:
            return await self.generate(prompt, stop=stop, headers=headers, timeout=timeout, **extra)

        results = await gather_bounded(
            one,
            prompts,
            concurrency=self._options.max_concurrency,
            return_exceptions=return_exceptions,
        )
        for item in results:
            if isinstance(item, BaseException) and not isinstance(item, ModalLLMError):
                raise item
        return results  # type: ignore[return-value]

    def map(
        self,
        items: Iterable[PromptLike] | AsyncIterable[PromptLike],
        *,
        ordered: bool = False,
        concurrency: int | None = None,
        window: int | None = None,
        rate_limit: float | RateLimiter | None = None,
        adaptive: bool | AdaptiveConcurrency = False,
        progress: bool = False,
        on_progress: ProgressCallback | None = None,
        total: int | None = None,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> AsyncGenerator[BatchResult, None]:
        """Generate for every item, pulled lazily; yield a ``BatchResult`` per item.

        ``items`` holds prompts, ``BatchItem``s or ``{"prompt", "id", **extra}`` mappings,
        from any iterable or async iterable. At most ``concurrency`` (default
        ``max_concurrency``) run at once and ``window`` (default twice that) are pulled
        ahead of you, so memory stays flat for millions of prompts. ``ordered=True`` keeps
        input order. ``rate_limit`` (requests/s or a shared ``RateLimiter``) paces the
        requests sent; ``adaptive`` backs off on 429/503. ``progress=True`` shows a tqdm
        bar; ``on_progress(done, total, failed)`` runs after each result. ``stop``,
        ``headers``, ``timeout`` and ``extra`` apply to every item (an item's own extras
        win). Failed items carry their ``ModalLLMError``; any other exception propagates.

        Raises ``ConfigError`` at once for an invalid option, and when ``concurrency`` (or
        an ``AdaptiveConcurrency``'s ``maximum``) exceeds the client's ``max_concurrency``
        or ``window``: the client's cap is the one rule, never lowered silently.
        See docs/batch.md.
        """
        plan = FanOutPlan.build(
            cap=self._options.max_concurrency,
            ordered=ordered,
            concurrency=concurrency,
            window=window,
            rate_limit=rate_limit,
            adaptive=adaptive,
            progress=progress,
            on_progress=on_progress,
            total=total,
        )
        if "prompt" in extra:
            raise ConfigError("extra must not contain 'prompt'")
        stops = normalize_stop(stop)
        complete = self._complete

        async def send(item: BatchItem, on_attempt: AttemptObserver | None) -> tuple[str, int]:
            body = {**extra, **item.extra} if item.extra else extra
            completion, attempts = await complete(
                item.prompt, headers, timeout, body, on_attempt=on_attempt
            )
            if not stops:
                return completion.prompt, attempts
            return StopMatcher(stops).apply(completion.prompt), attempts

        return fan_out(send, items, plan)

    def stream(
        self,
        prompt: str,
        *,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> AsyncGenerator[str, None]:
        """Yield the generated text piece by piece as the endpoint sends it.

        Works with SSE, NDJSON, plain-text and plain-JSON replies. Retried only if it fails
        before the first piece; later failures raise ``StreamError`` with ``partial_text``.
        Breaking out of the loop, cancelling, or ``aclose()`` closes the HTTP response.
        """
        stops = normalize_stop(stop)
        call = self._prepare(prompt, headers, timeout, extra, streaming=True)
        return self._stream(call, stops)

    # -- one logical call ------------------------------------------------------------------

    def _prepare(
        self,
        prompt: str,
        headers: HeaderTypes,
        timeout: TimeoutTypes | UseClientDefault,
        extra: dict[str, Any],
        *,
        streaming: bool = False,
    ) -> _Call:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a str, not {type(prompt).__name__}")
        payload: dict[str, Any] = {"prompt": prompt, **extra} if extra else {"prompt": prompt}
        flag = self._options.stream_flag
        if streaming and flag is not None:
            payload[flag] = True
        try:
            body = to_json(payload)
        except PydanticSerializationError as exc:
            raise ConfigError(f"model arguments are not JSON-serializable: {exc}") from None
        base = self._stream_headers if streaming else self._headers
        if headers:
            base = {**base, **validate_headers(headers)}
        return self._new_call(body, base, timeout, streaming=streaming)

    def _new_call(
        self,
        body: bytes,
        base_headers: dict[str, str],
        timeout: TimeoutTypes | UseClientDefault,
        *,
        streaming: bool = False,
    ) -> _Call:
        call_headers = dict(base_headers)
        # Unique per logical call: a random per-client prefix and a counter (no syscall).
        call_headers[IDEMPOTENCY_HEADER] = f"{self._key_prefix}{next(self._key_counter):08x}"
        call_headers[ATTEMPT_HEADER] = "1"
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
            return _Call(body, call_headers, aio_timeout, read, deadline_at)
        # Unary: the first byte is watched by FirstByteWatch, not by a timer per request.
        return _Call(body, call_headers, aio_timeout, read, deadline_at, parts.first_byte)

    async def _complete(
        self,
        prompt: str,
        headers: HeaderTypes,
        timeout: TimeoutTypes | UseClientDefault,
        extra: dict[str, Any],
        *,
        on_attempt: AttemptObserver | None = None,
    ) -> tuple[Completion, int]:
        """One unary call: the reply and how many attempts its POST took.

        ``on_attempt`` (per call, for fan-out) sees every failed attempt, before any retry.
        """
        if self._session is None or self._loop is not asyncio.get_running_loop():
            self._session_for_loop()
        call = self._prepare(prompt, headers, timeout, extra)
        call.on_attempt = on_attempt
        if call.deadline_at is None:
            return await self._post_and_follow(call)
        remaining = call.deadline_at - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(self._post_and_follow(call), remaining)
        except asyncio.TimeoutError:
            raise self._deadline_error(call) from None

    def _deadline_error(self, call: _Call) -> ModalLLMError:
        if call.result_url is not None:
            return ResultPendingError(
                "the deadline passed while the result was still being computed",
                result_url=call.result_url,
                hops=0,
                url=self._url,
            )
        return EndpointTimeoutError("the call's deadline passed", phase="deadline", url=self._url)

    async def _post_and_follow(self, call: _Call) -> tuple[Completion, int]:
        """One POST (retried), maybe a 303 chain, one parse: the whole unary call."""
        reply, attempts = await self._exchange("POST", self._url, call.body, call)
        if reply.location is not None:
            reply = await self._follow(reply, call)
        return self._parse(reply), attempts

    def _parse(self, reply: _Reply) -> Completion:
        # Imported here so that ``import modal_llm`` does not pay for pydantic's model
        # machinery; after the first reply this is a dictionary lookup.
        from ._models import parse_reply

        try:
            return parse_reply(reply.body, status_code=reply.status, url=reply.url)
        except ContractError as exc:
            exc.body_excerpt = excerpt(self._mask(reply.body))
            raise

    def _mask(self, body: bytes) -> bytes:
        """``body`` with our credential values replaced by ``***`` (an echo must not leak them)."""
        for secret in self._secrets:
            body = body.replace(secret, b"***")
        return body

    async def _follow(self, reply: _Reply, call: _Call) -> _Reply:
        """Follow Modal's 303 result-URL chain with GET; never re-send the POST."""
        hops = 0
        while reply.location is not None:
            hops += 1
            target = self._next_hop(reply, call, hops)
            log.debug("following %d to the result URL (hop %d)", reply.status, hops)
            reply, _ = await self._exchange("GET", target, None, call)
        return reply

    def _next_hop(self, reply: _Reply, call: _Call, hops: int) -> str:
        """Check one redirect and prepare ``call`` for the GET that follows it.

        Modal answers 303 with a result URL after 150 s; GETting it never restarts the
        work. 307/308 would make us re-send the prompt (and pay twice), so they stop here.
        """
        if reply.status in _REFUSED_REDIRECTS:
            raise RedirectError(
                f"{reply.status} redirect would re-send the prompt; not followed", url=reply.url
            )
        try:
            target = urljoin(reply.url, reply.location or "")
            cross_origin = not same_origin(self._url, target)
        except ValueError:  # a malformed Location: a bad IPv6 literal, a port out of range
            raise RedirectError("redirect to a malformed URL", url=reply.url) from None
        if not target.startswith(("http://", "https://")):
            raise RedirectError(f"redirect to a non-HTTP URL {redact_url(target)}", url=reply.url)
        call.result_url = target
        if hops > self._options.max_redirects:
            raise ResultPendingError(
                f"result still pending after {hops - 1} result-URL hops",
                result_url=target,
                hops=hops - 1,
                url=self._url,
            )
        if cross_origin:
            # Credentials go only to the endpoint's own origin, on any hop.
            call.headers = strip_credentials(call.headers)
        call.headers.pop("Content-Type", None)
        return target

    async def _exchange(
        self, method: str, url: str, data: bytes | None, call: _Call
    ) -> tuple[_Reply, int]:
        """One HTTP request with retries; returns the reply and the attempts it took."""
        try:
            return await self._fetch(method, url, data, call, 1), 1
        except ModalLLMError as exc:
            return await self._retry(partial(self._fetch, method, url, data, call), call, exc)

    async def _retry(
        self,
        send: Callable[[int], Awaitable[T]],
        call: _Call,
        first_error: ModalLLMError,
    ) -> tuple[T, int]:
        """Continue a request whose first attempt failed: retry ``send(n)`` or raise.

        The one retry driver for unary requests, 303 polls and stream openings.
        """
        self._notify_failure(first_error, call)
        policy = self._options.retry
        if policy.max_retries == 0 or not is_retryable(first_error, policy):
            first_error.attempts = 1
            raise first_error
        attempts = 1

        async def attempt(number: int) -> T:
            nonlocal attempts
            attempts = number
            try:
                return await send(number)
            except ModalLLMError as exc:
                self._notify_failure(exc, call)
                raise

        loop = asyncio.get_running_loop()
        result = await retry_call(
            attempt, first_error, policy, deadline_at=call.deadline_at, clock=loop.time
        )
        return result, attempts

    def _notify_failure(self, error: ModalLLMError, call: _Call) -> None:
        """Tell listeners and the call's own observer that one attempt failed, before any retry."""
        for listener in self._failure_listeners:
            listener(error)
        if call.on_attempt is not None:
            call.on_attempt(_FailedAttempt(error))

    async def _fetch(
        self, method: str, url: str, data: bytes | None, call: _Call, attempt: int
    ) -> _Reply:
        """Send one request under a concurrency slot and read its reply."""
        session = self._session
        if session is None:
            raise ClientClosedError("Cannot use a closed client; create a new one.", url=url)
        headers = call.headers
        if attempt != 1:
            headers = {**headers, ATTEMPT_HEADER: str(attempt)}
        slot = self._slot
        assert slot is not None
        errors = _ErrorMap(self, url)
        async with slot:
            # The first-byte clock starts once we hold a slot: queueing is not the endpoint's.
            first_byte = call.first_byte
            watch = self._watch
            assert watch is not None
            if first_byte is not None:
                task: Any = asyncio.current_task()
                bucket = watch.start(first_byte, task)
            try:
                with errors:
                    async with session.request(
                        method,
                        url,
                        data=data,
                        headers=headers,
                        allow_redirects=False,
                        timeout=call.aio_timeout,
                    ) as resp:
                        if first_byte is not None:
                            watch.stop(bucket, task)
                        errors.got_headers = True
                        if call.read_timeout is not None:  # error bodies can stall too
                            _set_read_timeout(resp, call.read_timeout)
                        status = resp.status
                        if status < 300:
                            return _Reply(status, await self._read_body(resp, url), None, url)
                        if status in _FOLLOWED_REDIRECTS or status in _REFUSED_REDIRECTS:
                            location = resp.headers.get("Location")
                            if location:
                                return _Reply(status, b"", location, url)
                        raise await self._status_error(resp, url)
            except asyncio.CancelledError:
                if first_byte is not None and watch.expired(task):
                    raise EndpointTimeoutError(
                        "timed out waiting for the first byte of the reply",
                        phase="first_byte",
                        url=url,
                    ) from None
                raise
            finally:
                if first_byte is not None:
                    watch.stop(bucket, task)

    async def _read_body(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
        cap = self._options.max_reply_bytes
        length = resp.content_length
        if length is not None:
            if length > cap:
                resp.close()
                raise ReplyTooLargeError(
                    f"reply of {length} bytes exceeds max_reply_bytes={cap}",
                    status_code=resp.status,
                    url=url,
                )
            return await resp.read()
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > cap:
                resp.close()
                raise ReplyTooLargeError(
                    f"reply exceeds max_reply_bytes={cap}",
                    status_code=resp.status,
                    body=b"".join(chunks)[:300],
                    url=url,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def _status_error(self, resp: aiohttp.ClientResponse, url: str) -> ModalLLMError:
        """Read (a bounded part of) an error body and build the matching ``StatusError``."""
        length = resp.content_length
        if length is not None and length <= _ERROR_BODY_LIMIT:
            body = await resp.read()  # fully read, so the connection goes back to the pool
        else:
            body = await resp.content.read(_ERROR_BODY_LIMIT)
            resp.close()
        headers = resp.headers
        cls = status_error_class(resp.status)
        retry_after = parse_retry_after(headers) if resp.status in (429, 503) else None
        return cls(
            status_code=resp.status,
            reason=resp.reason or "",
            body=self._mask(body),
            headers=headers,
            retry_after=retry_after,
            url=url,
        )

    # -- streaming -------------------------------------------------------------------------

    async def _stream(self, call: _Call, stops: tuple[str, ...]) -> AsyncGenerator[str, None]:
        self._session_for_loop()
        if call.deadline_at is None:
            opened = await self._open_stream(call)
        else:
            remaining = call.deadline_at - asyncio.get_running_loop().time()
            try:
                opened = await asyncio.wait_for(self._open_stream(call), remaining)
            except asyncio.TimeoutError:
                raise self._deadline_error(call) from None
        resp, decoder, first, errors = opened
        deadline_at = call.deadline_at
        matcher = StopMatcher(stops)
        sent: list[str] = []
        received = 0
        cap = self._options.max_reply_bytes
        finished = False
        try:
            pieces = first
            while True:
                for piece in pieces:
                    text = matcher.feed(piece)
                    if text:
                        sent.append(text)
                        yield text
                    if matcher.stopped:
                        return  # closes the connection so the endpoint stops generating
                error = decoder.error
                if error is not None:  # found after the pieces above, in the same chunk
                    error.partial_text = "".join(sent)  # type: ignore[attr-defined]
                    raise error
                if decoder.terminated:
                    break
                try:
                    with errors:
                        if deadline_at is None:
                            chunk = await resp.content.readany()
                        else:
                            chunk = await _read_before(resp, deadline_at)
                except ModalLLMError as exc:
                    raise StreamInterruptedError(
                        f"stream interrupted: {exc.message}",
                        partial_text="".join(sent),
                        url=errors.url,
                    ) from exc
                if not chunk:
                    try:
                        pieces = decoder.finish()
                    except StreamError as exc:
                        exc.partial_text = "".join(sent) + exc.partial_text
                        raise
                    if decoder.requires_terminator and not decoder.terminated:
                        for piece in pieces:  # deliver what did arrive before failing
                            text = matcher.feed(piece)
                            if text:
                                sent.append(text)
                                yield text
                        raise StreamInterruptedError(
                            "stream ended without its [DONE] terminator",
                            partial_text="".join(sent),
                            url=errors.url,
                        )
                    decoder.terminated = True
                    continue
                received += len(chunk)
                if received > cap:
                    raise ReplyTooLargeError(
                        f"stream exceeds max_reply_bytes={cap}", url=errors.url
                    )
                try:
                    pieces = decoder.feed(chunk)
                except StreamError as exc:
                    # The decoder reports pieces it decoded before the error, in this chunk.
                    exc.partial_text = "".join(sent) + exc.partial_text
                    raise
            tail = matcher.finish()
            if tail:
                sent.append(tail)
                yield tail
            finished = True
        finally:
            if finished:
                resp.release()
            else:
                resp.close()
            slot = self._slot
            if slot is not None:
                slot.release()

    async def _open_stream(
        self, call: _Call
    ) -> tuple[aiohttp.ClientResponse, StreamDecoder, list[str], _ErrorMap]:
        """Open the stream and read up to its first piece, with retries and 303 hops.

        Returns while still holding a concurrency slot; the caller releases it.
        """
        url, method = self._url, "POST"
        data: bytes | None = call.body
        hops = 0
        while True:
            try:
                opened = await self._open_stream_once(method, url, data, call, 1)
            except ModalLLMError as exc:
                send = partial(self._open_stream_once, method, url, data, call)
                opened, _ = await self._retry(send, call, exc)
            if isinstance(opened, tuple):
                return opened
            # A redirect: follow it as a GET, exactly like the unary path.
            hops += 1
            target = self._next_hop(opened, call, hops)
            url, method, data = target, "GET", None

    async def _open_stream_once(
        self, method: str, url: str, data: bytes | None, call: _Call, attempt: int
    ) -> tuple[aiohttp.ClientResponse, StreamDecoder, list[str], _ErrorMap] | _Reply:
        session = self._session_for_loop()
        headers = call.headers
        if attempt != 1:
            headers = {**headers, ATTEMPT_HEADER: str(attempt)}
        slot = self._slot
        assert slot is not None
        await slot.acquire()
        errors = _ErrorMap(self, url)
        resp: aiohttp.ClientResponse | None = None
        try:
            with errors:
                resp = await session.request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                    timeout=call.aio_timeout,
                )
                errors.got_headers = True
                status = resp.status
                if status >= 300:
                    if status in _FOLLOWED_REDIRECTS or status in _REFUSED_REDIRECTS:
                        location = resp.headers.get("Location")
                        if location:
                            resp.release()
                            slot.release()
                            return _Reply(status, b"", location, url)
                    raise await self._status_error(resp, url)
                if call.read_timeout is not None:
                    _set_read_timeout(resp, call.read_timeout)
                decoder = decoder_for(
                    resp.headers.get("Content-Type"),
                    require_done=self._options.stream_require_done,
                    max_buffer=self._options.max_reply_bytes,
                )
                received = 0
                cap = self._options.max_reply_bytes
                while True:
                    chunk = await resp.content.readany()
                    if not chunk:
                        pieces = decoder.finish()
                        if decoder.requires_terminator and not decoder.terminated:
                            raise StreamInterruptedError(
                                "stream ended without its [DONE] terminator", url=url
                            )
                        decoder.terminated = True
                        return resp, decoder, pieces, errors
                    received += len(chunk)
                    if received > cap:
                        raise ReplyTooLargeError(f"stream exceeds max_reply_bytes={cap}", url=url)
                    pieces = decoder.feed(chunk)
                    if pieces or decoder.terminated:
                        return resp, decoder, pieces, errors
        except ModalLLMError as exc:
            if isinstance(exc, ConnectError) and not isinstance(exc, ServerStreamError):
                # Nothing has reached the caller yet, so a drop here is safe to retry.
                exc.before_response = True
            elif isinstance(exc, ContractError) and self._secrets:  # a JSON reply, echoed
                exc.body_excerpt = self._mask(exc.body_excerpt.encode()).decode()
            _abandon(resp)
            slot.release()
            raise
        except BaseException:
            _abandon(resp)
            slot.release()
            raise


async def _read_before(resp: aiohttp.ClientResponse, deadline_at: float) -> bytes:
    """Read the next chunk, or fail once the call's deadline has passed."""
    remaining = deadline_at - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise EndpointTimeoutError("the call's deadline passed", phase="deadline")
    try:
        return await asyncio.wait_for(resp.content.readany(), remaining)
    except asyncio.TimeoutError:
        raise EndpointTimeoutError("the call's deadline passed", phase="deadline") from None


def _abandon(resp: aiohttp.ClientResponse | None) -> None:
    if resp is not None:
        resp.close()


def _set_read_timeout(resp: aiohttp.ClientResponse, seconds: float) -> None:
    """Switch the socket from the first-byte timeout to the between-chunks timeout.

    aiohttp has one ``sock_read`` for both; its own websocket code adjusts
    ``protocol.read_timeout`` the same way once the handshake is done.
    """
    if resp.content.is_eof():
        # The whole body is in (the usual case for a JSON reply); aiohttp dropped the
        # timer at EOF, and a re-armed one would fire later on an idle pooled socket.
        return
    connection = resp.connection
    if connection is not None and connection.protocol is not None:
        protocol = connection.protocol
        protocol.read_timeout = seconds
        # The running timer still counts the first-byte timeout until the next data
        # arrives; restart it so the between-chunks timeout applies from now on.
        protocol.start_timeout()
