"""``AsyncClient``: the public face of the client, and the one place a logical call runs.

It owns the session's lifecycle (one pooled aiohttp session per client, created in the
first loop that uses it), turns arguments into a ``Call`` and runs it: ``_scope`` is
where every logical call (unary, stream, resume) starts and ends. The HTTP work lives in
``_send`` (one request, error mapping, byte caps), ``_unary`` and ``_redirects`` (a
reply and the 303 chain), ``_streaming`` (a stream); retries in ``_retry``; observers in
``_hooks``; calls are built by ``_call``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
)
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, overload

from ._auth import unmask_url
from ._batch import BatchResult, ProgressCallback, PromptLike, gather_bounded
from ._call import Call, Redirect, deadline_error, deadline_expired
from ._config import (
    USE_CLIENT_DEFAULT,
    TimeoutTypes,
    UseClientDefault,
)
from ._exceptions import (
    ConfigError,
    ModalLLMError,
    mask_error,
)
from ._hooks import AttemptHook, CallHooks
from ._lazy import LazyModule
from ._lifecycle import PooledClient, State
from ._pacing import AdaptiveConcurrency, RateLimiter  # map()'s signature: get_type_hints
from ._stop import StopMatcher, normalize_stop
from ._types import HeaderTypes, StopTypes
from ._unary import completion_of, follow, post_and_follow, text_of

if TYPE_CHECKING:
    import modal_llm._models as _models
    import modal_llm._streaming as _streaming

    from ._call import Reply
    from ._otel import CallScope
else:  # loaded by the first reply or stream, not on import (typing.get_type_hints: _lazy.py)
    _models = LazyModule("modal_llm._models")
    _streaming = LazyModule("modal_llm._streaming")

__all__ = ["AsyncClient"]

log = logging.getLogger("modal_llm")

T = TypeVar("T")


_NO_SCOPE: Final[contextlib.AbstractContextManager[None]] = contextlib.nullcontext()


class AsyncClient(PooledClient):
    """An asyncio client for a Modal LLM web endpoint, with one pooled connection set.

    Usage::

        async with AsyncClient("https://me--llm-web.modal.run") as client:
            text = await client.generate("Identify yourself, bot!", max_tokens=64)
            async with client.stream("Tell me a story", stop=["\\n\\n"]) as pieces:
                async for piece in pieces:
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
        text, _ = await self._complete(prompt, headers, timeout, extra, text_of, stop=stop)
        if stop is None:
            return text
        return StopMatcher(normalize_stop(stop)).apply(text)

    async def complete(
        self,
        prompt: str,
        *,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> _models.Completion:
        """Like ``generate`` but return the whole reply: ``.text`` and ``.data`` (all keys)."""
        completion, _ = await self._complete(prompt, headers, timeout, extra, completion_of)
        return completion

    async def resume(
        self,
        result_url: str,
        *,
        max_redirects: int | None = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> _models.Completion:
        """Keep polling a Modal result URL (from ``ResultPendingError.result_url``).

        This never sends the prompt again, so the work is paid for once. Each ``resume()``
        has its own budget of ``max_redirects`` further hops (default: the client's
        ``max_redirects``); when it runs out it raises ``ResultPendingError`` again, with
        the URL to resume from (see docs/errors.md for the loop).
        """
        budget = self._options.max_redirects if max_redirects is None else max_redirects
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ConfigError(f"max_redirects must be an int >= 1, not {max_redirects!r}")
        if not isinstance(result_url, str):
            raise ConfigError(f"result_url must be a str, not {type(result_url).__name__}")
        call = self._calls.resume(timeout)
        # A masked .result_url (query auth) gets this client's own query values back.
        redirect = Redirect(303, unmask_url(result_url, self._url), self._url)
        self._transport_for_loop()  # opens the session, which decides telemetry
        if self._telemetry is not None:
            call.observer = self._observe(call, None, {}, None)
        transport = self._transport_for_loop()
        retry = self._options.retry
        run = partial(follow, transport, redirect, call, self._url, retry, budget, completion_of)
        return await self._run_call(call, run)

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
        if isinstance(prompts, str) or not hasattr(prompts, "__iter__"):
            raise ConfigError(f"prompts must be an iterable of str, not {type(prompts).__name__}")

        # Each item awaits generate's own coroutine (no wrapper per item).
        one = partial(self.generate, stop=stop, headers=headers, timeout=timeout, **extra)
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
        from ._fanout import FanOutPlan, fan_out  # once per map(), not on import

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

        def send(
            prompt: str, own: Mapping[str, Any] | None, on_attempt: AttemptHook | None
        ) -> Awaitable[tuple[str, int]]:
            # A plain function: without stop sequences the call's own coroutine is awaited.
            body = extra if own is None else {**extra, **own}
            if not stops:
                return complete(prompt, headers, timeout, body, text_of, on_attempt=on_attempt)
            return cut(prompt, body, on_attempt)

        async def cut(
            prompt: str, body: dict[str, Any], on_attempt: AttemptHook | None
        ) -> tuple[str, int]:
            text, attempts = await complete(
                prompt, headers, timeout, body, text_of, on_attempt=on_attempt, stop=stops
            )
            return StopMatcher(stops).apply(text), attempts

        results = fan_out(send, items, plan)
        if plan.limiter is None or (self._telemetry is None and self._state is State.OPENED):
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
    ) -> _streaming.TextStream:
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
        from ._streaming import StreamState, TextStream, stream_pieces  # not on import

        stops = normalize_stop(stop)
        call = self._calls.request(prompt, headers, timeout, extra, None, streaming=True)
        if self._telemetry is not None or self._state is State.UNOPENED:
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

    def _complete(
        self,
        prompt: str,
        headers: HeaderTypes,
        timeout: TimeoutTypes | UseClientDefault,
        extra: dict[str, Any],
        parse: Callable[[Reply], T],
        *,
        on_attempt: AttemptHook | None = None,
        stop: object = None,
    ) -> Coroutine[Any, Any, tuple[T, int]]:
        """One unary call, to be awaited: its parsed reply (``completion_of``, or ``text_of``
        for the text alone) and how many attempts its POST took.

        ``on_attempt`` also sees this call's ``AttemptEvent``s (fan-out, telemetry).
        ``stop`` (applied by the caller) is only recorded by telemetry. A plain function
        returning the call's coroutine, so the hot path has no wrapper coroutine of its own:
        without telemetry or a deadline it is ``post_and_follow``'s, which masks its errors.
        """
        transport = self._transport
        if transport is None or self._loop is not asyncio.get_running_loop():
            transport = self._transport_for_loop()
        call = self._calls.request(prompt, headers, timeout, extra, on_attempt)
        opts = self._options
        if self._telemetry is not None:
            call.observer = self._observe(call, prompt, extra, stop)
            if call.observer is not None:
                url, retry, hops = self._url, opts.retry, opts.max_redirects
                run = partial(post_and_follow, transport, call, url, retry, hops, parse)
                return self._run_call(call, run)
        # The hot path: _run_call without a scope to enter (nothing records this call).
        work = post_and_follow(transport, call, self._url, opts.retry, opts.max_redirects, parse)
        if call.deadline_at is None:
            return work
        return self._before_deadline(call, work)

    def _scope(self, call: Call) -> contextlib.AbstractContextManager[CallScope | None]:
        """The one place every logical call (unary, stream, resume) starts and ends, when
        the client records telemetry (a unary call that nothing records skips it).

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
                mask_error(exc, call.secrets)  # a resume's errors (post_and_follow masks its own)
                raise
            if observer is not None and observer.capture_content:
                observer.reply = _text_of(result)
            return result

    async def _before_deadline(self, call: Call, work: Awaitable[T]) -> T:
        """``work`` under ``Timeout.deadline``; its error, or the deadline's, masked."""
        assert call.deadline_at is not None
        remaining = call.deadline_at - asyncio.get_running_loop().time()
        try:
            try:
                return await asyncio.wait_for(work, remaining)
            except asyncio.TimeoutError as exc:
                if not deadline_expired(exc):
                    raise  # a phase timeout or PoolTimeoutError of the call itself
                raise deadline_error(call, self._url) from None
        except ModalLLMError as exc:
            mask_error(exc, call.secrets)
            raise


def _text_of(result: object) -> str | None:
    """The generated text of what ``_run_call`` returns: a ``Completion`` or a tuple of
    the text or a ``Completion`` and the attempts."""
    completion = result[0] if isinstance(result, tuple) else result
    if isinstance(completion, str):
        return completion
    text = getattr(completion, "prompt", None)
    return text if isinstance(text, str) else None
