"""The cost of OpenTelemetry on the CPU-bound throughput workload: tracing off vs on.

``python -m benchmarks.otel_overhead [--n 20000] [--concurrency 64] [--rounds 5]``

The same ``AsyncClient.generate_many`` run as the throughput workload, against nginx's
fixed reply (the Python endpoint if nginx is missing), with the client's telemetry:

- ``off``: the ``otel`` extra installed, no provider configured (the client keeps no
  instrumentation: one ``is None`` check per call);
- ``traces``: an SDK ``TracerProvider``, ``SimpleSpanProcessor`` into an in-memory exporter;
- ``traces+metrics``: the same plus an SDK ``MeterProvider`` with an in-memory reader.

Configurations alternate within each round (order rotated), so drift on a shared machine
hits them alike; the report gives the median of the rounds. CPU time is the process's
(``time.process_time``), which is what tracing adds to.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks._clients import THROUGHPUT_PROMPT
from benchmarks._servers import Servers

CONFIGS = ("off", "traces", "traces+metrics")


def _providers(config: str) -> tuple[dict[str, Any], Callable[[], int]]:
    """Client options for ``config``, and a function that drops the spans exported so far
    and returns how many there were."""
    if config == "off":
        return {}, lambda: 0
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    options: dict[str, Any] = {"tracer_provider": tracer_provider}
    if config == "traces+metrics":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        options["meter_provider"] = MeterProvider(metric_readers=[InMemoryMetricReader()])

    def clear() -> int:
        spans = len(exporter.get_finished_spans())
        exporter.clear()
        return spans

    return options, clear


async def _measure(url: str, config: str, n: int, concurrency: int) -> dict[str, float]:
    from modal_llm import AsyncClient

    options, clear = _providers(config)
    async with AsyncClient(url, max_concurrency=concurrency, **options) as client:
        await client.generate_many(itertools.repeat(THROUGHPUT_PROMPT, min(n, 2000)))  # warm-up
        assert (clear() > 0) == (config != "off")  # the warm-up was traced, or not
        cpu0, wall0 = time.process_time(), time.perf_counter()
        texts = await client.generate_many(itertools.repeat(THROUGHPUT_PROMPT, n))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        clear()
    assert len(texts) == n
    return {"rps": n / wall, "cpu_us_per_req": cpu / n * 1e6}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.otel_overhead")
    parser.add_argument("--n", type=int, default=20_000, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-nginx", action="store_true", help="use the Python endpoint")
    args = parser.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpus = {cpus[0]} if len(cpus) >= 2 else None
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    results: dict[str, list[dict[str, float]]] = {c: [] for c in CONFIGS}
    with Servers(use_nginx=not args.no_nginx, server_cpus=server_cpus, log=log) as servers:
        server = servers.cpu_server()
        if server_cpus is not None:
            os.sched_setaffinity(0, {cpus[-1]})  # the client on its own CPU, as in _run.py
        for rnd in range(args.rounds):
            shift = rnd % len(CONFIGS)
            for config in CONFIGS[shift:] + CONFIGS[:shift]:
                result = asyncio.run(_measure(server.url, config, args.n, args.concurrency))
                results[config].append(result)
                log(
                    f"round {rnd + 1} {config:>15}: {result['rps']:8.0f} req/s, "
                    f"{result['cpu_us_per_req']:6.1f} µs CPU/req"
                )
    base = statistics.median(r["cpu_us_per_req"] for r in results["off"])
    print(
        f"\nCPU-bound throughput, generate_many, c={args.concurrency}, n={args.n}, "
        f"{server.kind}, median of {args.rounds} rounds\n"
    )
    print("| telemetry | req/s | µs CPU/req | overhead |")
    print("| --- | ---: | ---: | ---: |")
    for config in CONFIGS:
        rps = statistics.median(r["rps"] for r in results[config])
        cpu = statistics.median(r["cpu_us_per_req"] for r in results[config])
        extra = "" if config == "off" else f"+{cpu - base:.1f} µs (+{(cpu / base - 1):.0%})"
        print(f"| {config} | {rps:.0f} | {cpu:.1f} | {extra} |")


if __name__ == "__main__":
    main()
