"""OpenTelemetry spans and metrics for modal-llm calls (the ``otel`` extra).

Imported only through ``_telemetry.instrumentation_for``, never by ``import modal_llm``.
Names follow the GenAI semantic conventions (status: development) and are written as
strings here, because the semantic-conventions package marks its ``gen_ai.*`` constants
as moving. One ``Instrumentation`` per client; one ``CallScope`` per logical call, the context
manager of the send path's one start/end of a call (``AsyncClient._scope``)::

    scope = instrumentation.start(call, prompt, extra, clock=loop.time)
    call.hooks = ... scope.on_attempt ...   # retries become span events and counts
    with scope:                             # the span is current: aiohttp's spans nest
        ...                                 # (a stream: only while it opens)

Spans: ``text_completion {model}`` (kind CLIENT), with ``modal_llm.retry`` events.
Metrics (the instruments are in ``_otelmetrics.py``): ``gen_ai.client.operation.duration``,
``gen_ai.client.operation.time_to_first_chunk``, ``modal_llm.client.retries``,
``modal_llm.client.active_requests`` and ``modal_llm.client.concurrency.limit``. See
docs/observability.md.

Nothing secret is recorded: no header, no URL (only ``server.address``/``server.port``),
no error body; prompts and replies only with ``capture_content=True``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from contextvars import Token
from types import TracebackType
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from ._exceptions import ModalLLMError, mask_text, printable
from ._otelmetrics import (
    SCOPE_NAME,
    Instruments,
    LimitLike,
    instruments_for,
    real_meter_provider,
    scope_version,
)

__all__ = ["CallScope", "Instrumentation"]

log = logging.getLogger("modal_llm")

OPERATION: Final = "text_completion"
"""``gen_ai.operation.name``: a prompt in, generated text out (no chat messages)."""
PROVIDER: Final = "modal"
DEFAULT_MODEL: Final = "modal"
"""The model in the span name when the call's extras have no ``model``."""

# Request parameters recorded from a call's extras (numbers only; a bool is not one).
_NUMBER_PARAMS: Final = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("top_k", "gen_ai.request.top_k"),
    ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ("presence_penalty", "gen_ai.request.presence_penalty"),
    ("seed", "gen_ai.request.seed"),
)
_QUERY = re.compile(r"\?\S*")


class AttemptLike(Protocol):
    """The fields of ``modal_llm.AttemptEvent`` that telemetry reads."""

    @property
    def attempt(self) -> int: ...
    @property
    def status(self) -> int | None: ...
    @property
    def error(self) -> ModalLLMError | None: ...
    @property
    def will_retry(self) -> bool: ...
    @property
    def wait(self) -> float | None: ...
    @property
    def retry_after(self) -> bool: ...


class CallLike(Protocol):
    """What telemetry reads of the send path's ``Call`` (``_call.Call``)."""

    @property
    def kind(self) -> str: ...
    @property
    def sent(self) -> int: ...
    @property
    def hops(self) -> int: ...
    @property
    def first_piece_at(self) -> float | None: ...
    @property
    def secrets(self) -> tuple[str, ...]: ...


def _real_tracer_provider(given: TracerProvider | None) -> TracerProvider | None:
    provider = given if given is not None else trace.get_tracer_provider()
    # The API's defaults (no SDK configured) would hand out non-recording spans.
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider


def _server_attributes(endpoint_url: str) -> dict[str, Any]:
    """``server.address`` and ``server.port`` of the endpoint; never the path or query."""
    parts = urlsplit(endpoint_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return {"server.address": parts.hostname or "", "server.port": port}


def _stop_sequences(value: object) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(s, str) for s in value):
        return list(value)
    return None


def _messages(role: str, text: str, finish: bool = False) -> str:
    """One text message in the GenAI conventions' JSON message shape."""
    message: dict[str, Any] = {"role": role, "parts": [{"type": "text", "content": text}]}
    if finish:
        message["finish_reason"] = "stop"
    return json.dumps([message], ensure_ascii=False)


def error_type(error: BaseException) -> str:
    """``error.type``: the error's class name (``RateLimitError``, ``CancelledError``)."""
    return type(error).__qualname__


def _describe(error: BaseException) -> str:
    """A span status description: the class and our one-line message, minus URL queries.

    ``str(error)`` is not used: it ends with a body excerpt, which may echo the prompt.
    """
    if isinstance(error, ModalLLMError):
        return f"{error_type(error)}: {printable(_QUERY.sub('', error.message))}"
    return error_type(error)


class Instrumentation:
    """The spans and metrics of one client; built once, when its session opens."""

    __slots__ = ("_active", "_base", "_instruments", "_tracer", "capture_content")

    def __init__(
        self,
        tracer: Tracer | None,
        instruments: Instruments | None,
        base: dict[str, Any],
        capture_content: bool,
    ) -> None:
        self._tracer = tracer
        self._instruments = instruments
        self._base = base
        self._active = None if instruments is None else instruments.active_for(base)
        self.capture_content = capture_content

    @classmethod
    def build(
        cls,
        endpoint_url: str,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        capture_content: bool = False,
    ) -> Instrumentation | None:
        """Use the given providers, else the global ones; ``None`` if neither records."""
        tracers = _real_tracer_provider(tracer_provider)
        meters = real_meter_provider(meter_provider)
        if tracers is None and meters is None:
            return None
        tracer = None if tracers is None else tracers.get_tracer(SCOPE_NAME, scope_version())
        instruments = None if meters is None else instruments_for(meters)
        base = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": PROVIDER,
            **_server_attributes(endpoint_url),
        }
        return cls(tracer, instruments, base, bool(capture_content))

    @property
    def tracing(self) -> bool:
        return self._tracer is not None

    def start(
        self,
        call: CallLike,
        prompt: str | None,
        extra: Mapping[str, Any],
        *,
        stop: object = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> CallScope | None:
        """Start one logical call: its span (not yet current) and its in-flight count.

        ``extra`` are the model arguments sent; ``stop`` the client-side stop sequences,
        recorded when the extras carry none; ``prompt`` is None for ``resume``.
        ``clock`` is the clock of ``call.first_piece_at`` (the loop's ``time``). ``None``
        (and a logged error) if the SDK fails: telemetry never breaks a call.
        """
        try:
            return self._start(call, prompt, extra, stop, clock)
        except Exception:
            log.exception("OpenTelemetry failed to start a call's span; not recorded")
            return None

    def _start(
        self,
        call: CallLike,
        prompt: str | None,
        extra: Mapping[str, Any],
        stop: object,
        clock: Callable[[], float],
    ) -> CallScope:
        stream = call.kind == "stream"
        model = extra.get("model") if extra else None
        if not isinstance(model, str) or not model:
            model = None
        labels = self._base if model is None else {**self._base, "gen_ai.request.model": model}
        span: Span | None = None
        if self._tracer is not None:
            attributes: dict[str, Any] = dict(labels)
            if extra:
                for key, name in _NUMBER_PARAMS:
                    value = extra.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        attributes[name] = value
                stops = _stop_sequences(extra.get("stop", stop))
            else:
                stops = _stop_sequences(stop)
            if stops is not None:
                attributes["gen_ai.request.stop_sequences"] = stops
            attributes["modal_llm.stream"] = stream
            if self.capture_content and prompt is not None:
                # Masked as errors are: a prompt may quote a credential we send.
                masked = mask_text(prompt, call.secrets)
                attributes["gen_ai.input.messages"] = _messages("user", masked)
            span = self._tracer.start_span(
                f"{OPERATION} {model or DEFAULT_MODEL}", kind=SpanKind.CLIENT, attributes=attributes
            )
        if self._active is not None:
            self._active.count += 1
        return CallScope(self, call, span, labels, clock)

    def track_limit(self, limiter: LimitLike) -> Callable[[], None]:
        """Report ``limiter.limit`` on the concurrency-limit gauge until the returned
        callable is called (a running ``map`` with ``adaptive``)."""
        if self._instruments is None:
            return _nothing
        return self._instruments.track(limiter, self._base)


def _nothing() -> None:
    return None


class CallScope:
    """One logical call's span and measurements, as the context manager the send path
    enters where the call starts and exits where it ends (``AsyncClient._scope``).

    Strictly private; not thread-safe. For a unary call or ``resume`` the span is current
    inside the ``with``; a stream's generator spans ``yield``s, where the caller's code
    runs (maybe in another context), so it is made current only while the stream opens
    (``attach``/``detach`` in the stream consumer).
    """

    __slots__ = (
        "_call",
        "_clock",
        "_ended",
        "_inst",
        "_labels",
        "_started",
        "_token",
        "reply",
        "span",
    )

    def __init__(
        self,
        inst: Instrumentation,
        call: CallLike,
        span: Span | None,
        labels: Mapping[str, Any],
        clock: Callable[[], float],
    ) -> None:
        self._inst = inst
        self._call = call
        self.span = span
        self._labels = labels
        self._clock = clock
        self._started = clock()
        self._token: Token[Context] | None = None
        self._ended = False
        self.reply: str | None = None
        """The generated text, set by the send path when ``capture_content`` is on."""

    @property
    def capture_content(self) -> bool:
        """Whether the send path should set ``reply`` (it is recorded)."""
        return self._inst.capture_content

    # -- context ---------------------------------------------------------------------------

    def __enter__(self) -> CallScope:
        if self._call.kind != "stream":
            self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.detach()
            # A stream the caller left early (break, aclose) is closed with GeneratorExit.
            self.end(None if isinstance(exc, GeneratorExit) else exc)
        except Exception:  # telemetry never replaces a call's outcome
            log.exception("OpenTelemetry failed to end a call's span")

    def attach(self) -> None:
        """Make the span current in this context (so per-attempt HTTP spans nest)."""
        if self.span is not None and self._token is None:
            self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def detach(self) -> None:
        """Undo ``attach``; must run in the same context (never across a ``yield``)."""
        token, self._token = self._token, None
        if token is not None:
            otel_context.detach(token)

    # -- what happens during the call -------------------------------------------------------

    def on_attempt(self, event: AttemptLike) -> None:
        """Every attempt's outcome; a retried one becomes a ``modal_llm.retry`` event."""
        if not event.will_retry:
            return
        reason: dict[str, Any] = {}
        if event.status is not None:
            reason["http.response.status_code"] = event.status
        if event.error is not None:
            reason["error.type"] = error_type(event.error)
        instruments = self._inst._instruments
        if instruments is not None:
            instruments.retries.add(1, {**self._labels, **reason})
        if self.span is not None:
            details: dict[str, Any] = {"modal_llm.attempt": event.attempt, **reason}
            if event.wait is not None:
                details["modal_llm.retry.wait"] = event.wait
            details["modal_llm.retry.retry_after"] = event.retry_after
            self.span.add_event("modal_llm.retry", details)

    def end(self, error: BaseException | None = None) -> None:
        """Finish the call once: duration, time to first chunk, in-flight count, the span's
        status and attributes. Call ``detach`` first, in the context that attached."""
        if self._ended:
            return
        self._ended = True
        call = self._call
        inst = self._inst
        labels = self._labels
        if error is not None:
            labels = {**labels, "error.type": error_type(error)}
        first_chunk = None
        if call.kind == "stream" and call.first_piece_at is not None:
            first_chunk = max(0.0, call.first_piece_at - self._started)
        if inst._instruments is not None:
            inst._instruments.duration.record(self._clock() - self._started, labels)
            if first_chunk is not None:
                inst._instruments.first_chunk.record(first_chunk, self._labels)
        if inst._active is not None:
            inst._active.count -= 1
        span = self.span
        if span is None:
            return
        if span.is_recording():  # a sampled-out span takes no attributes
            attributes: dict[str, Any] = {
                "modal_llm.attempts": call.sent,
                "modal_llm.redirect_hops": call.hops,
            }
            if first_chunk is not None:
                attributes["modal_llm.time_to_first_chunk"] = first_chunk
            if error is not None:
                attributes["error.type"] = error_type(error)
                span.set_status(Status(StatusCode.ERROR, _describe(error)))
            elif self.reply is not None and inst.capture_content:
                # Masked as errors are: a server may echo a credential we sent.
                reply = mask_text(self.reply, call.secrets)
                attributes["gen_ai.output.messages"] = _messages("assistant", reply, True)
            span.set_attributes(attributes)
        span.end()
