"""Print the trace and metrics of one call that hits a 429, a cold start and a 303 hop.

``python docs/examples/otel_trace.py`` (needs ``pip install -e '.[dev]'`` in a checkout): the
reference endpoint answers the first POST 429 with ``Retry-After: 1``, then cold-starts
for 2 s and, the work taking longer than its 0.3 s hop time, redirects to its result URL.
The spans go to an in-memory exporter and are printed as an indented tree; the output is
in docs/observability.md.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modal_llm import AsyncClient
from modal_llm.server import ServerConfig, serve

COMMON = ("gen_ai.operation.name", "gen_ai.provider.name", "server.address", "server.port")


async def one_call(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
    config = ServerConfig(
        error_burst=1,
        error_status=429,
        retry_after="1",
        cold_start=2.0,
        work_time=0.5,
        hop_time=0.3,
    )
    async with (
        serve(config) as url,
        AsyncClient(url, tracer_provider=tracer_provider, meter_provider=meter_provider) as client,
    ):
        with tracer_provider.get_tracer("app").start_as_current_span("handle /summarize"):
            await client.generate("Summarize this", model="llama-3-8b", max_tokens=64)


def print_tree(spans: list[ReadableSpan]) -> None:
    spans = sorted(spans, key=lambda s: s.start_time or 0)
    t0 = spans[0].start_time or 0
    by_id = {s.context.span_id: s for s in spans}

    def depth(span: ReadableSpan) -> int:
        n = 0
        while span.parent is not None and span.parent.span_id in by_id:
            span, n = by_id[span.parent.span_id], n + 1
        return n

    for span in spans:
        pad = "  " * depth(span)
        start = ((span.start_time or 0) - t0) / 1e9
        took = ((span.end_time or 0) - (span.start_time or 0)) / 1e9
        status = span.status.status_code.name
        print(f"{pad}{span.name}  [{start:.3f}s +{took:.3f}s] {span.kind.name} {status}")
        for key, value in (span.attributes or {}).items():
            print(f"{pad}    {key} = {json.dumps(value)}")
        for event in span.events:
            at = (event.timestamp - t0) / 1e9
            details = json.dumps(dict(event.attributes or {}))
            print(f"{pad}    event {event.name} @ {at:.3f}s {details}")


def print_metrics(reader: InMemoryMetricReader) -> None:
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            if scope.scope.name != "modal_llm":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    labels = {k: v for k, v in (point.attributes or {}).items() if k not in COMMON}
                    p: Any = point
                    value = f"count={p.count} sum={p.sum:.3f}" if hasattr(p, "count") else p.value
                    print(f"{metric.name} {json.dumps(labels)} {value}")


def main() -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    AioHttpClientInstrumentor().instrument(tracer_provider=tracer_provider)
    asyncio.run(one_call(tracer_provider, meter_provider))
    print_tree(list(exporter.get_finished_spans()))
    print()
    print_metrics(reader)


if __name__ == "__main__":
    main()
