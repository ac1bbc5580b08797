"""OpenTelemetry: one CLIENT span per logical call, retry events, metrics, no secrets.

Every test hands the client its own SDK providers with an in-memory span exporter and
metric reader; the global providers are never set (they can be set once per process).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from modal_llm import (
    USE_CLIENT_DEFAULT,
    AdaptiveConcurrency,
    AsyncClient,
    AuthenticationError,
    Client,
    ConfigError,
    RateLimitError,
    ResultPendingError,
    RetryPolicy,
    ServerError,
    StreamError,
    Timeout,
    UseClientDefault,
)
from modal_llm._otel import Instrumentation
from modal_llm._telemetry import instrumentation_for
from modal_llm.server import ServerConfig, serve

from .conftest import NO_WAIT, MakeEndpoint

KEY, SECRET, BEARER, QUERY_VALUE = "wk-k3y-value", "ws-s3cret-value", "b3arer-token", "q5tring"
SECRETS = (KEY, SECRET, BEARER, QUERY_VALUE, "token=")


class Otel:
    """SDK providers wired to in-memory exporters, for one test."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def providers(self) -> dict[str, Any]:
        return {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}

    def spans(self) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith("text_")]

    def span(self) -> ReadableSpan:
        spans = self.spans()
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def all_metric_labels(self) -> list[dict[str, Any]]:
        data = self.reader.get_metrics_data()
        return [
            dict(point.attributes or {})
            for resource in (data.resource_metrics if data else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
            for point in metric.data.data_points
        ]

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.close()


@pytest.fixture
async def endpoint() -> AsyncIterator[str]:
    async with serve(ServerConfig(pieces=4)) as url:
        yield url


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# -- the call span ----------------------------------------------------------------------------


async def test_one_client_span_per_call(otel: Otel, endpoint: str) -> None:
    port = int(endpoint.rsplit(":", 1)[1].strip("/"))
    async with AsyncClient(endpoint, **otel.providers) as client:
        await client.generate("hi", model="tiny", max_tokens=5, temperature=0.5, top_p=1)
    span = otel.span()
    assert span.name == "text_completion tiny"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    assert attrs(span) == {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "modal",
        "gen_ai.request.model": "tiny",
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": 1,
        "server.address": "127.0.0.1",
        "server.port": port,
        "modal_llm.stream": False,
        "modal_llm.attempts": 1,
        "modal_llm.redirect_hops": 0,
    }
    assert not span.events
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 1
    assert "error.type" not in duration.attributes
    assert duration.attributes["gen_ai.request.model"] == "tiny"
    (active,) = otel.points("modal_llm.client.active_requests")
    assert active.value == 0


async def test_model_defaults_to_modal_and_stop_sequences_are_recorded(
    otel: Otel, endpoint: str
) -> None:
    async with AsyncClient(endpoint, **otel.providers) as client:
        await client.generate("hi")
        async for _ in client.stream("hi", stop=["\n", "END"]):
            pass
        await client.generate("hi", stop="zz")
    unary, stream, stopped = otel.spans()
    assert unary.name == stream.name == "text_completion modal"
    assert "gen_ai.request.model" not in attrs(unary)
    assert "gen_ai.request.stop_sequences" not in attrs(unary)
    assert attrs(stream)["gen_ai.request.stop_sequences"] == ("\n", "END")
    assert attrs(stopped)["gen_ai.request.stop_sequences"] == ("zz",)


async def test_the_span_is_a_child_of_the_callers_span(otel: Otel, endpoint: str) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    async with AsyncClient(endpoint, **otel.providers) as client:
        with tracer.start_as_current_span("handle request") as parent:
            await client.generate("hi")
            assert trace.get_current_span() is parent  # our span was detached again
    span = otel.span()
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.context.trace_id == parent.get_span_context().trace_id


async def test_a_persistent_500_without_retries_is_an_error_span(otel: Otel) -> None:
    config = ServerConfig(error_burst=100, error_status=500)
    async with serve(config) as url, AsyncClient(url, max_retries=0, **otel.providers) as client:
        with pytest.raises(ServerError):
            await client.generate("hi")
    span = otel.span()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is not None
    assert span.status.description.startswith("ServerError: 500")
    assert attrs(span)["error.type"] == "ServerError"
    assert attrs(span)["modal_llm.attempts"] == 1
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "ServerError"
    assert otel.points("modal_llm.client.retries") == []


async def test_a_429_then_a_200_is_one_span_with_one_retry_event(otel: Otel) -> None:
    config = ServerConfig(error_burst=1, error_status=429, retry_after="0")
    async with serve(config) as url, AsyncClient(url, retry=NO_WAIT, **otel.providers) as client:
        assert await client.generate("hi")
    span = otel.span()
    assert span.status.status_code is StatusCode.UNSET
    assert attrs(span)["modal_llm.attempts"] == 2
    (event,) = span.events
    assert event.name == "modal_llm.retry"
    assert dict(event.attributes or {}) == {
        "modal_llm.attempt": 1,
        "http.response.status_code": 429,
        "error.type": "RateLimitError",
        "modal_llm.retry.wait": 0.0,
        "modal_llm.retry.retry_after": True,
    }
    (retries,) = otel.points("modal_llm.client.retries")
    assert retries.value == 1
    assert retries.attributes["http.response.status_code"] == 429
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert "error.type" not in duration.attributes


async def test_retries_that_run_out_end_with_the_last_error(otel: Otel) -> None:
    config = ServerConfig(error_burst=100, error_status=429)
    policy = RetryPolicy(max_retries=2, wait_initial=0, wait_max=0, jitter=0)
    async with serve(config) as url, AsyncClient(url, retry=policy, **otel.providers) as client:
        with pytest.raises(RateLimitError):
            await client.generate("hi")
    span = otel.span()
    assert attrs(span)["error.type"] == "RateLimitError"
    assert attrs(span)["modal_llm.attempts"] == 3
    assert [e.attributes["modal_llm.attempt"] for e in span.events] == [1, 2]  # type: ignore[index]
    assert all(e.attributes["modal_llm.retry.retry_after"] is False for e in span.events)  # type: ignore[index]
    (retries,) = otel.points("modal_llm.client.retries")
    assert retries.value == 2


async def test_redirect_hops_are_counted(otel: Otel) -> None:
    config = ServerConfig(work_time=0.05, hop_time=0.01)
    async with serve(config) as url, AsyncClient(url, **otel.providers) as client:
        await client.generate("hi")
    hops = attrs(otel.span())["modal_llm.redirect_hops"]
    assert isinstance(hops, int)
    assert hops >= 1


async def test_a_resumed_call_is_its_own_span(otel: Otel) -> None:
    config = ServerConfig(work_time=0.3, hop_time=0.05)
    async with serve(config) as url, AsyncClient(url, max_redirects=1, **otel.providers) as client:
        with pytest.raises(ResultPendingError) as info:
            await client.generate("long job")
        completion = await client.resume(info.value.result_url, max_redirects=50)
    assert completion.text
    first, resumed = otel.spans()
    assert attrs(first)["error.type"] == "ResultPendingError"
    assert resumed.name == "text_completion modal"
    assert resumed.status.status_code is StatusCode.UNSET
    assert attrs(resumed)["modal_llm.redirect_hops"] >= 1  # type: ignore[operator]


# -- streams ----------------------------------------------------------------------------------


async def test_a_stream_records_time_to_first_chunk(otel: Otel, endpoint: str) -> None:
    async with AsyncClient(endpoint, **otel.providers) as client:
        pieces = [p async for p in client.stream("hello there", model="tiny")]
    assert len(pieces) > 1
    span = otel.span()
    assert span.name == "text_completion tiny"
    assert attrs(span)["modal_llm.stream"] is True
    first = attrs(span)["modal_llm.time_to_first_chunk"]
    assert isinstance(first, float)
    assert first > 0
    assert span.status.status_code is StatusCode.UNSET
    (ttfc,) = otel.points("gen_ai.client.operation.time_to_first_chunk")
    assert ttfc.count == 1
    assert ttfc.attributes["gen_ai.request.model"] == "tiny"
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.sum >= ttfc.sum


async def test_a_stream_retried_before_its_first_piece_has_a_retry_event(otel: Otel) -> None:
    config = ServerConfig(pieces=3, error_burst=1, error_status=503, retry_after="0")
    async with (
        serve(config) as url,
        AsyncClient(url, retry=NO_WAIT, **otel.providers) as client,
        client.stream("hello there") as pieces,
    ):
        assert [p async for p in pieces]
    span = otel.span()
    (event,) = span.events
    assert event.attributes is not None
    assert event.attributes["http.response.status_code"] == 503
    assert attrs(span)["modal_llm.attempts"] == 2
    (retries,) = otel.points("modal_llm.client.retries")
    assert retries.attributes["http.response.status_code"] == 503


async def test_a_stream_the_caller_leaves_early_is_not_an_error(otel: Otel, endpoint: str) -> None:
    async with AsyncClient(endpoint, **otel.providers) as client:
        stream = client.stream("hello there")
        async for _ in stream:
            break
        await stream.aclose()
        assert otel.span().status.status_code is StatusCode.UNSET
        (active,) = otel.points("modal_llm.client.active_requests")
        assert active.value == 0


async def test_a_stream_failing_midway_is_an_error_span(otel: Otel) -> None:
    config = ServerConfig(pieces=4, stream_error_after=2)
    async with serve(config) as url, AsyncClient(url, **otel.providers) as client:
        with pytest.raises(StreamError):
            async for _ in client.stream("hello there"):
                pass
    span = otel.span()
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["error.type"] == "ServerStreamError"
    assert "modal_llm.time_to_first_chunk" in attrs(span)


async def test_a_stream_that_cannot_open_is_an_error_span(otel: Otel) -> None:
    config = ServerConfig(error_burst=100, error_status=500)
    async with serve(config) as url, AsyncClient(url, max_retries=0, **otel.providers) as client:
        with pytest.raises(ServerError):
            async for _ in client.stream("hello"):
                pass
    span = otel.span()
    assert attrs(span)["error.type"] == "ServerError"
    assert "modal_llm.time_to_first_chunk" not in attrs(span)
    assert otel.points("gen_ai.client.operation.time_to_first_chunk") == []


async def test_the_callers_context_survives_a_stream(otel: Otel, endpoint: str) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    async with AsyncClient(endpoint, **otel.providers) as client:
        with tracer.start_as_current_span("consumer") as consumer:
            async for _ in client.stream("hello there"):
                # Between pieces the caller's span is current, not ours.
                assert trace.get_current_span() is consumer
    assert otel.span().parent.span_id == consumer.get_span_context().span_id  # type: ignore[union-attr]


# -- per-attempt HTTP spans from opentelemetry-instrumentation-aiohttp-client ------------------


@pytest.fixture
def aiohttp_instrumented(otel: Otel) -> Iterator[None]:
    pytest.importorskip("opentelemetry.instrumentation.aiohttp_client")
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

    instrumentor = AioHttpClientInstrumentor()
    instrumentor.instrument(tracer_provider=otel.tracer_provider)
    try:
        yield
    finally:
        instrumentor.uninstrument()


@pytest.mark.usefixtures("aiohttp_instrumented")
@pytest.mark.parametrize("timeout", [USE_CLIENT_DEFAULT, Timeout(deadline=60)])
async def test_aiohttp_attempt_spans_nest_under_the_call_span(
    otel: Otel, timeout: Timeout | UseClientDefault
) -> None:
    # With a deadline the call runs under asyncio.wait_for: another task, the same parent.
    config = ServerConfig(pieces=3, error_burst=1, error_status=429, retry_after="0")
    async with serve(config) as url, AsyncClient(url, retry=NO_WAIT, **otel.providers) as client:
        await client.generate("hi", timeout=timeout)
        async for _ in client.stream("hello there", timeout=timeout):
            pass
    finished = otel.exporter.get_finished_spans()
    unary, stream = otel.spans()
    http = [s for s in finished if s.kind is SpanKind.CLIENT and not s.name.startswith("text_")]
    under_unary = [s for s in http if s.parent and s.parent.span_id == unary.context.span_id]
    under_stream = [s for s in http if s.parent and s.parent.span_id == stream.context.span_id]
    assert len(under_unary) == 2  # the 429 and the 200
    assert len(under_stream) == 1
    assert len(http) == 3
    assert {s.context.trace_id for s in under_unary} == {unary.context.trace_id}


# -- content and secrets ----------------------------------------------------------------------


async def test_content_is_not_recorded_by_default(otel: Otel, endpoint: str) -> None:
    async with AsyncClient(endpoint, **otel.providers) as client:
        await client.generate("my private prompt")
        async for _ in client.stream("my private prompt"):
            pass
    for span in otel.spans():
        assert not any(k.startswith(("gen_ai.input", "gen_ai.output")) for k in attrs(span))
        assert "private" not in json.dumps(attrs(span))


async def test_capture_content_records_prompt_and_reply(otel: Otel, endpoint: str) -> None:
    async with AsyncClient(endpoint, capture_content=True, **otel.providers) as client:
        text = await client.generate("hello there")
        pieces = [p async for p in client.stream("hello there")]
    unary, stream = otel.spans()
    for span, reply in ((unary, text), (stream, "".join(pieces))):
        (message,) = json.loads(attrs(span)["gen_ai.input.messages"])
        assert message == {"role": "user", "parts": [{"type": "text", "content": "hello there"}]}
        (answer,) = json.loads(attrs(span)["gen_ai.output.messages"])
        assert answer["role"] == "assistant"
        assert answer["parts"] == [{"type": "text", "content": reply}]


async def test_no_credential_or_query_string_is_ever_exported(otel: Otel) -> None:
    config = ServerConfig(
        modal_key=KEY, modal_secret=SECRET, error_burst=1, error_status=429, retry_after="0"
    )
    async with serve(config) as base:
        url = f"{base}?token={QUERY_VALUE}"
        options: dict[str, Any] = {
            "modal_key": KEY,
            "modal_secret": SECRET,
            "headers": {"Authorization": f"Bearer {BEARER}"},
            "retry": NO_WAIT,
            **otel.providers,
        }
        async with AsyncClient(url, **options) as client:
            await client.generate("hi")
            async for _ in client.stream("hi"):
                pass
        wrong = {**options, "modal_secret": SECRET + "-wrong"}
        async with AsyncClient(url, **wrong) as client:
            with pytest.raises(AuthenticationError):
                await client.generate("hi")
    exported = [
        (
            s.name,
            attrs(s),
            s.status.description,
            [(e.name, dict(e.attributes or {})) for e in s.events],
        )
        for s in otel.spans()
    ]
    text = json.dumps([exported, otel.all_metric_labels()], default=str)
    assert "modal_llm.retry" in text and "error.type" in text  # the dump holds real data
    for secret in SECRETS:
        assert secret not in text


# -- metrics ------------------------------------------------------------------------------------


async def test_active_requests_counts_calls_in_flight(
    otel: Otel, make_endpoint: MakeEndpoint
) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({"prompt": "ok"})

    url = await make_endpoint(handler)
    async with AsyncClient(url, **otel.providers) as client:
        task = asyncio.create_task(client.generate("hi"))
        await arrived.wait()
        (active,) = otel.points("modal_llm.client.active_requests")
        assert active.value == 1
        release.set()
        await task
    (active,) = otel.points("modal_llm.client.active_requests")
    assert active.value == 0


async def test_the_adaptive_limit_of_a_running_map_is_a_gauge(otel: Otel, endpoint: str) -> None:
    limiter = AdaptiveConcurrency(8, initial=5)
    async with AsyncClient(endpoint, max_concurrency=8, **otel.providers) as client:
        results = client.map([f"p{i}" for i in range(20)], adaptive=limiter)
        async for _ in results:
            (gauge,) = otel.points("modal_llm.client.concurrency.limit")
            assert gauge.value == limiter.limit
            assert gauge.attributes["server.address"] == "127.0.0.1"
            break
        await results.aclose()
        assert otel.points("modal_llm.client.concurrency.limit") == []


async def test_clients_sharing_a_meter_provider_share_instruments(
    otel: Otel, endpoint: str
) -> None:
    async with (
        AsyncClient(endpoint, **otel.providers) as one,
        AsyncClient(endpoint, **otel.providers) as two,
    ):
        await one.generate("a")
        await two.generate("b")
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 2
    (active,) = otel.points("modal_llm.client.active_requests")  # one endpoint: one sum
    assert active.value == 0


# -- when nothing is recorded -------------------------------------------------------------------


async def test_no_provider_configured_means_no_instrumentation(endpoint: str) -> None:
    # This process imported OpenTelemetry but never set a global provider.
    async with AsyncClient(endpoint) as client:
        await client.generate("hi")
        assert client._telemetry is None
    assert instrumentation_for(endpoint) is None


def test_a_meter_provider_alone_records_metrics_only(otel: Otel) -> None:
    inst = Instrumentation.build("https://x.modal.run", meter_provider=otel.meter_provider)
    assert inst is not None
    assert not inst.tracing
    scope = inst.start(FakeCall(), "hi", {})
    assert scope.span is None
    scope.end()
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.attributes["server.port"] == 443


def test_without_opentelemetry_imported_nothing_is_imported() -> None:
    code = (
        "import sys\n"
        "from modal_llm._telemetry import instrumentation_for\n"
        "assert instrumentation_for('https://x.modal.run') is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="tracer_provider"):
        AsyncClient("http://127.0.0.1:1/", tracer_provider=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="meter_provider"):
        AsyncClient("http://127.0.0.1:1/", meter_provider="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="capture_content"):
        AsyncClient("http://127.0.0.1:1/", capture_content=1)  # type: ignore[arg-type]


# -- unit: the scope fed by attempt events -------------------------------------------------------


@dataclass
class FakeCall:
    kind: str = "unary"
    sent: int = 1
    hops: int = 0
    first_piece_at: float | None = None


@dataclass(frozen=True)
class FakeAttempt:
    attempt: int
    status: int | None
    error: Any
    will_retry: bool
    wait: float | None
    retry_after: bool


def test_a_transport_retry_is_labelled_by_error_type(otel: Otel) -> None:
    from modal_llm import ConnectError

    inst = Instrumentation.build("http://h:8080/x?token=q", **otel.providers)
    assert inst is not None
    call = FakeCall()
    scope = inst.start(call, "hi", {"temperature": True, "seed": 7})
    scope.on_attempt(FakeAttempt(1, None, ConnectError("refused"), True, 0.25, False))
    scope.on_attempt(FakeAttempt(2, 200, None, False, None, False))
    call.sent = 2
    scope.end()
    scope.end()  # idempotent
    span = otel.span()
    assert attrs(span)["modal_llm.attempts"] == 2
    assert "gen_ai.request.temperature" not in attrs(span)  # a bool is not a temperature
    assert attrs(span)["gen_ai.request.seed"] == 7
    assert attrs(span)["server.port"] == 8080
    (event,) = span.events
    assert dict(event.attributes or {}) == {
        "modal_llm.attempt": 1,
        "error.type": "ConnectError",
        "modal_llm.retry.wait": 0.25,
        "modal_llm.retry.retry_after": False,
    }
    (retries,) = otel.points("modal_llm.client.retries")
    assert retries.attributes["error.type"] == "ConnectError"
    assert "http.response.status_code" not in retries.attributes


# -- the blocking Client ------------------------------------------------------------------------


@pytest.fixture
def threaded_endpoint() -> Iterator[str]:
    """The reference endpoint on its own thread and loop, for the blocking client."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    found: list[str] = []
    stop = asyncio.Event()

    async def run() -> None:
        async with serve(ServerConfig()) as url:
            found.append(url)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield found[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


def test_the_blocking_client_takes_the_providers_and_the_callers_span(
    otel: Otel, threaded_endpoint: str
) -> None:
    tracer = otel.tracer_provider.get_tracer("app")
    with (
        Client(threaded_endpoint, **otel.providers) as client,
        tracer.start_as_current_span("handler") as parent,
    ):
        client.generate("hi")  # runs on the client's loop thread
        pieces = list(client.stream("hello there"))
    assert pieces
    unary, stream = otel.spans()
    for span in (unary, stream):
        assert span.parent is not None
        assert span.parent.span_id == parent.get_span_context().span_id


# -- LangChain ----------------------------------------------------------------------------------


async def test_langchain_classes_take_the_providers(otel: Otel, endpoint: str) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.load import dumpd

    from modal_llm.langchain import ChatModal, Modal

    llm = Modal(endpoint_url=endpoint, **otel.providers)
    chat = ChatModal(endpoint_url=endpoint, capture_content=True, **otel.providers)
    await llm.ainvoke("hi")
    await chat.ainvoke("hello")
    assert len(otel.spans()) == 2
    assert any("gen_ai.input.messages" in attrs(s) for s in otel.spans())
    assert "tracer_provider" not in json.dumps(dumpd(llm), default=str)


# -- telemetry never breaks a call ----------------------------------------------------------------


async def test_a_failing_span_processor_does_not_fail_the_call(
    endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.sdk.trace import SpanProcessor

    class Broken(SpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            raise RuntimeError("processor bug")

    provider = TracerProvider()
    provider.add_span_processor(Broken())
    async with AsyncClient(endpoint, tracer_provider=provider) as client:
        assert await client.generate("hi")
        assert [p async for p in client.stream("hello there")]
    assert "failed to start a call's span" in caplog.text
    provider.shutdown()


async def test_captured_content_is_masked_like_errors(
    otel: Otel, make_endpoint: MakeEndpoint
) -> None:
    async def echo(request: web.Request) -> web.Response:
        sent = f"{request.headers['Modal-Secret']} {request.headers['X-Api-Key']}"
        return web.json_response({"prompt": f"you sent {sent} and {request.query['token']}"})

    url = await make_endpoint(echo) + f"?token={QUERY_VALUE}"
    options: dict[str, Any] = {"headers": {"X-Api-Key": "api-key-value-1"}, **otel.providers}
    async with AsyncClient(
        url, modal_key=KEY, modal_secret=SECRET, capture_content=True, **options
    ) as client:
        text = await client.generate(f"repeat {SECRET}")
    assert SECRET in text  # the caller gets the reply as sent; only the export is masked
    exported = json.dumps(attrs(otel.span()))
    for value in (SECRET, "api-key-value-1", QUERY_VALUE):
        assert value not in exported
    (answer,) = json.loads(attrs(otel.span())["gen_ai.output.messages"])
    assert answer["parts"][0]["content"] == "you sent *** *** and ***"
