"""``AsyncClient``: the public face of the client, and the one place a logical call runs.

It owns the session's lifecycle (one pooled aiohttp session per client, created in the
first loop that uses it), turns arguments into a ``Call`` and runs it: ``_scope`` is
where every logical call (unary, stream, resume) starts and ends. The HTTP work lives in
``_send`` (one request, error mapping, byte caps), ``_redirects`` (the 303 chain) and
``_streaming`` (the stream consumer); retries in ``_retry``; observers in ``_hooks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import warnings
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, overload

import aiohttp

from ._batch import gather_bounded
from ._call import Call, CallFactory, Redirect, Reply, deadline_error
from ._config import (
    DNS_CACHE_TTL,
    KEEPALIVE_TIMEOUT,
    USE_CLIENT_DEFAULT,
    ClientOptions,
    ClientSettings,
    TimeoutTypes,
    UseClientDefault,
)
from ._exceptions import (
    ClientClosedError,
    ConfigError,
    ModalLLMError,
    mask_error,
    redact_url,
)
from ._fanout import (
    BatchItem,
    BatchResult,
    FanOutPlan,
    ProgressCallback,
    PromptLike,
    fan_out,
)
from ._hooks import AttemptHook, CallHooks
from ._pacing import AdaptiveConcurrency, RateLimiter
from ._redirects import next_hop
from ._retry import retry_failed, send_with_retries
from ._send import Transport
from ._stop import StopMatcher, normalize_stop
from ._streaming import StreamState, TextStream, stream_pieces
from ._telemetry import instrumentation_for
from ._types import HeaderTypes, StopTypes
from ._watch import FirstByteWatch

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._models import Completion
    from ._otel import CallScope, Instrumentation

__all__ = ["AsyncClient"]

log = logging.getLogger("modal_llm")

T = TypeVar("T")


_NO_SCOPE: Final[contextlib.AbstractContextManager[None]] = contextlib.nullcontext()


class _State(enum.Enum):
    UNOPENED = 1  # no session yet: it is created inside the first running loop that uses us
    OPENED = 2  # a session exists and belongs to ``_loop``
    CLOSED = 3  # aclose() ran; the client cannot be reopened


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
    ``connection_limit``, ``event_hooks`` (``{"attempt": [f], "failure": [g]}``: see
    ``AttemptEvent``); OpenTelemetry's ``tracer_provider``/``meter_provider`` (default:
    the global ones) and ``capture_content`` (docs/observability.md). The URL falls back
    to ``MODAL_LLM_ENDPOINT_URL``.
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
        self._transport: Transport | None = None
        self._slot: asyncio.Semaphore | None = None  # the transport's, for inspection
        self._calls = CallFactory(options)
        self._secrets = self._calls.secrets
        self._telemetry: Instrumentation | None = None  # decided when the transport opens
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
        """Close the connection pool. Idempotent; the client cannot be used afterwards.

        Streams still open are cut (their next read raises ``StreamInterruptedError``).
        """
        session, self._session = self._session, None
        self._state = _State.CLOSED
        if self._transport is not None:
            self._transport.closed = True
        if session is not None and not session.closed:
            await session.close()

    def __del__(self, _warnings: Any = warnings) -> None:
        # Never await here: the loop may be closed. Tell the user about the leak in one
        # line of our own, and keep aiohttp from adding its "Unclosed client session".
        session = self._session
        if self._state is not _State.OPENED or session is None or session.closed:
            return
        message = (
            f"AsyncClient for {redact_url(self._url)} was never closed; use "
            "'async with AsyncClient(...) as client:' or 'await client.aclose()'"
        )
        connector = session.connector
        session.detach()
        if connector is not None:
            with contextlib.suppress(Exception):  # aiohttp's own __del__, minus its warning
                connector._close()
        log.warning(message)
        _warnings.warn(message, ResourceWarning, source=self, stacklevel=1)

    def _session_for_loop(self) -> aiohttp.ClientSession:
        return self._transport_for_loop().session

    def _transport_for_loop(self) -> Transport:
        loop = asyncio.get_running_loop()
        transport = self._transport
        if transport is not None and self._loop is loop and not transport.closed:
            return transport
        if self._state is _State.CLOSED:
            raise ClientClosedError("Cannot use a closed client; create a new one.")
        if transport is not None:
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
            timeout=self._calls.aio_timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._transport = transport = Transport(session, opts, FirstByteWatch(loop))
        self._telemetry = instrumentation_for(
            opts.endpoint_url,
            tracer_provider=opts.tracer_provider,
            meter_provider=opts.meter_provider,
            capture_content=opts.capture_content,
        )
        self._slot = transport.slot
        self._loop = loop
        self._state = _State.OPENED
        return transport

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
        completion, _ = await self._complete(prompt, headers, timeout, extra, stop=stop)
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
        max_redirects: int | None = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Completion:
        """Keep polling a Modal result URL (from ``ResultPendingError.result_url``).

        This never sends the prompt again, so the work is paid for once. Each ``resume()``
        has its own budget of ``max_redirects`` further hops (default: the client's
        ``max_redirects``); when it runs out it raises ``ResultPendingError`` again, with
        the URL to resume from (see docs/errors.md for the loop).
        """
        budget = self._options.max_redirects if max_redirects is None else max_redirects
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ConfigError(f"max_redirects must be an int >= 1, not {max_redirects!r}")
        call = self._calls.resume(timeout)
        redirect = Redirect(303, result_url, self._url)
        self._transport_for_loop()  # decides telemetry
        if self._telemetry is not None:
            call.observer = self._observe(call, None, {}, None)
        return await self._run_call(call, partial(self._follow, redirect, call, budget))

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

        async def send(item: BatchItem, on_attempt: AttemptHook | None) -> tuple[str, int]:
            body = {**extra, **item.extra} if item.extra else extra
            completion, attempts = await complete(
                item.prompt, headers, timeout, body, on_attempt=on_attempt, stop=stops or None
            )
            if not stops:
                return completion.prompt, attempts
            return StopMatcher(stops).apply(completion.prompt), attempts

        results = fan_out(send, items, plan)
        if plan.limiter is None or (self._telemetry is None and self._state is _State.OPENED):
            return results
        return self._gauging_limit(results, plan.limiter)

    async def _gauging_limit(
        self, results: AsyncGenerator[BatchResult, None], limiter: AdaptiveConcurrency
    ) -> AsyncGenerator[BatchResult, None]:
        """``map`` results, with the adaptive limit on the telemetry gauge meanwhile."""
        self._transport_for_loop()  # decides telemetry
        telemetry = self._telemetry
        untrack = None if telemetry is None else telemetry.track_limit(limiter)
        try:
            async for result in results:
                yield result
        finally:
            if untrack is not None:
                untrack()
            await results.aclose()

    def stream(
        self,
        prompt: str,
        *,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> TextStream:
        """Stream the generated text piece by piece as the endpoint sends it.

        Usage::

            async with client.stream("Tell me a story") as pieces:
                async for piece in pieces:
                    print(piece, end="")

        Works with SSE, NDJSON, plain-text and plain-JSON replies. Retried only if it fails
        before the first piece; later failures raise ``StreamError`` with ``partial_text``.
        Leaving the ``async with`` block closes the response and frees its concurrency
        slot; without it, close an unfinished stream with ``await pieces.aclose()``. Nothing
        is sent until the first piece is asked for.
        """
        stops = normalize_stop(stop)
        call = self._calls.request(prompt, headers, timeout, extra, None, streaming=True)
        if self._telemetry is not None or self._state is _State.UNOPENED:
            # Started by _scope when the stream opens: nothing is sent before that.
            call.observer = partial(self._observe, call, prompt, extra, stops or None)
        state = StreamState()
        opts = self._options
        pieces = stream_pieces(
            self._transport_for_loop,
            self._scope,
            call,
            stops,
            state,
            endpoint_url=self._url,
            max_redirects=opts.max_redirects,
            retry=opts.retry,
            require_done=opts.stream_require_done,
        )
        return TextStream(pieces, state, self._url)

    # -- one logical call ------------------------------------------------------------------

    async def _complete(
        self,
        prompt: str,
        headers: HeaderTypes,
        timeout: TimeoutTypes | UseClientDefault,
        extra: dict[str, Any],
        *,
        on_attempt: AttemptHook | None = None,
        stop: object = None,
    ) -> tuple[Completion, int]:
        """One unary call: its ``Completion`` and how many attempts its POST took.

        ``on_attempt`` also sees this call's ``AttemptEvent``s (fan-out, telemetry).
        ``stop`` (applied by the caller) is only recorded by telemetry.
        """
        transport = self._transport
        if transport is None or self._loop is not asyncio.get_running_loop():
            transport = self._transport_for_loop()
        call = self._calls.request(prompt, headers, timeout, extra, on_attempt)
        if self._telemetry is not None:
            call.observer = self._observe(call, prompt, extra, stop)
        # As _run_call does, inlined: this is the hot path.
        with self._scope(call) as observer:
            try:
                if call.deadline_at is None:
                    result = await self._post_and_follow(transport, call)
                else:
                    work = self._post_and_follow(transport, call)
                    result = await self._before_deadline(call, work)
            except ModalLLMError as exc:
                mask_error(exc, self._secrets)
                raise
            if observer is not None and observer.capture_content:
                observer.reply = result[0].prompt
            return result

    def _scope(self, call: Call) -> contextlib.AbstractContextManager[CallScope | None]:
        """The one place every logical call (unary, stream, resume) starts and ends.

        Entered before the call's first request and exited when its outcome is known (for a
        stream: when it is closed), with the call's error, already masked, if it failed.
        ``call.kind``, ``call.hops``, ``call.sent``, ``call.first_piece_at`` and
        ``call.hooks`` (its ``AttemptEvent`` subscribers) are there: the telemetry seam.
        With telemetry on, it is the call's ``CallScope`` (its span current inside).
        """
        observer = call.observer
        if observer is None:
            return _NO_SCOPE
        if callable(observer):  # a stream's: telemetry is decided once its transport opens
            self._transport_for_loop()
            observer = call.observer = observer()
            if observer is None:
                return _NO_SCOPE
        return observer  # type: ignore[no-any-return]

    def _observe(
        self, call: Call, prompt: str | None, extra: dict[str, Any], stop: object
    ) -> CallScope | None:
        """Start ``call``'s telemetry (span, in-flight count) and subscribe it to the
        call's attempt events; ``None`` when the client records nothing."""
        telemetry = self._telemetry
        if telemetry is None:
            return None
        clock = asyncio.get_running_loop().time
        scope = telemetry.start(call, prompt, extra, stop=stop, clock=clock)
        if scope is None:
            return None
        hooks = call.hooks
        stream = call.kind == "stream"
        if hooks is None:
            call.hooks = CallHooks((scope.on_attempt,), (), stream=stream)
        else:
            attempt = (*hooks.attempt, scope.on_attempt)
            call.hooks = CallHooks(attempt, hooks.failure, stream=stream)
        return scope

    async def _run_call(self, call: Call, run: Callable[[], Awaitable[T]]) -> T:
        """Run a non-streaming call in its scope, under ``Timeout.deadline``; mask its error."""
        with self._scope(call) as observer:
            try:
                if call.deadline_at is None:
                    result = await run()
                else:
                    result = await self._before_deadline(call, run())
            except ModalLLMError as exc:
                mask_error(exc, self._secrets)
                raise
            if observer is not None and observer.capture_content:
                observer.reply = _text_of(result)
            return result

    async def _before_deadline(self, call: Call, work: Awaitable[T]) -> T:
        assert call.deadline_at is not None
        remaining = call.deadline_at - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(work, remaining)
        except asyncio.TimeoutError:
            raise deadline_error(call, self._url) from None

    async def _post_and_follow(self, transport: Transport, call: Call) -> tuple[Completion, int]:
        """One POST (retried), maybe a 303 chain, one parse: the whole unary call."""
        url = self._url
        if call.hooks is None:  # the hot path: attempt 1 inline, the driver only on failure
            try:
                reply: Reply | Redirect = await transport.fetch("POST", url, call.body, call, 1)
                attempts = 1
            except ModalLLMError as exc:
                send = partial(transport.fetch, "POST", url, call.body, call)
                loop_time = asyncio.get_running_loop().time
                reply, attempts = await retry_failed(
                    exc, send, call, self._options.retry, loop_time
                )
        else:
            send = partial(transport.fetch, "POST", url, call.body, call)
            loop_time = asyncio.get_running_loop().time
            reply, attempts = await send_with_retries(send, call, self._options.retry, loop_time)
        if isinstance(reply, Redirect):
            return await self._follow(reply, call, self._options.max_redirects), attempts
        return self._parse(reply), attempts

    async def _follow(self, redirect: Redirect, call: Call, max_redirects: int) -> Completion:
        """Follow Modal's 303 result-URL chain with GET; never re-send the POST."""
        transport = self._transport_for_loop()
        loop_time = asyncio.get_running_loop().time
        reply: Reply | Redirect = redirect
        while isinstance(reply, Redirect):
            target = next_hop(reply, call, self._url, max_redirects)
            send = partial(transport.fetch, "GET", target, None, call)
            reply, _ = await send_with_retries(send, call, self._options.retry, loop_time)
        return self._parse(reply)

    def _parse(self, reply: Reply) -> Completion:
        # Imported here so that ``import modal_llm`` does not pay for pydantic's model
        # machinery; after the first reply this is a dictionary lookup.
        from ._models import parse_reply

        return parse_reply(reply.body, status_code=reply.status, url=reply.url)


def _text_of(result: object) -> str | None:
    """The generated text of what ``_run_call`` returns: a ``Completion`` or a tuple."""
    completion = result[0] if isinstance(result, tuple) else result
    text = getattr(completion, "prompt", None)
    return text if isinstance(text, str) else None
