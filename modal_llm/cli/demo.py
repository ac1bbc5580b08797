"""``modal-llm demo``: the reference endpoint in-process, one streamed answer, one fan-out."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Final

from .._argtypes import MAX_CONCURRENCY, count
from .._batch import BatchResult
from .._client import AsyncClient
from .._config import RetryPolicy
from .._exceptions import ModalLLMError, StatusError
from .._hooks import AttemptEvent, AttemptHook
from .._progress import INSTALL_HINT, Progress
from .common import EXIT_OK

__all__ = ["add_parser", "demo"]

_DEMO_PROMPT: Final = "Explain in one breath why the sky is blue"
MAX_DEMO_PROMPTS: Final = 1_000_000
"""The demo keeps every result for its summary: a bigger run is a job for ``batch``."""


def add_parser(commands: Any) -> None:
    """Register ``demo`` on the ``commands`` subparsers."""
    demo = commands.add_parser(
        "demo",
        help="run a local reference endpoint, stream an answer and fan out a batch",
        description="Start the reference endpoint in-process (a toy generator, no account, "
        "no network), stream one answer, fan out a batch and print a summary.",
    )
    prompts, in_flight = count(1, MAX_DEMO_PROMPTS), count(1, MAX_CONCURRENCY)
    demo.add_argument("--prompts", type=prompts, default=300, help="batch size (300)")
    demo.add_argument("--concurrency", type=in_flight, default=16, help="in flight (16)")
    demo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show progress (a tqdm bar if installed, else a counter)",
    )


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return 0.0
    return values[max(0, math.ceil(q * len(values)) - 1)]


async def demo(args: argparse.Namespace) -> int:
    """Run the demo; return the exit status."""
    from ..server import STATS, ServerConfig, create_app, serve

    # A little latency, a streamed answer in pieces, and a few injected failures: the
    # first two POSTs get 503 (containers starting) and every 25th gets 429.
    config = ServerConfig(
        pieces=12,
        piece_delay=0.03,
        latency=0.04,
        error_burst=2,
        error_status=503,
        rate_limit_every=25,
        retry_after="0",
        seed=1,
    )
    app = create_app(config)
    out = sys.stdout
    retry = RetryPolicy(max_retries=5, wait_initial=0.05, wait_max=0.5, jitter=0.05)
    async with serve(app) as url:
        print(f"reference endpoint (a toy generator, not a model) at {url}")
        failures: list[str] = []

        def on_failure(event: AttemptEvent) -> None:
            if event.error is not None and event.will_retry:
                failures.append(_status_of(event.error))

        hooks: dict[str, list[AttemptHook]] = {"failure": [on_failure]}
        async with AsyncClient(
            url, max_concurrency=args.concurrency, retry=retry, event_hooks=hooks
        ) as client:
            print(f"\nstreaming: {_DEMO_PROMPT!r}")
            async with client.stream(_DEMO_PROMPT) as stream:
                async for piece in stream:
                    out.write(piece)
                    out.flush()
            out.write("\n")
            stream_retries = len(failures)
            if failures:
                print(f"(the endpoint answered {', '.join(failures)} first; the client retried)")

            count = args.prompts
            print(f"\nfanning out {count} prompts, {args.concurrency} in flight:", flush=True)
            progress = Progress(count, enabled=args.progress)
            if progress.fallback:
                print(f"({INSTALL_HINT} for a progress bar)", file=sys.stderr)
            prompts = (f"summarise report number {i} for the board" for i in range(count))
            results: list[BatchResult] = []
            started = time.perf_counter()
            try:
                async for result in client.map(prompts):
                    results.append(result)
                    progress.advance(failed=not result.ok)
            finally:
                progress.close()
            elapsed = time.perf_counter() - started
        stats = app[STATS]
        http = _Requests(stats.posts + stats.gets, stream_retries, len(failures), stats.gets)
    _summary(results, elapsed, http, args.concurrency)
    return EXIT_OK


def _status_of(error: ModalLLMError) -> str:
    return str(error.status_code) if isinstance(error, StatusError) else type(error).__name__


@dataclass(frozen=True)
class _Requests:
    """What the endpoint saw: every HTTP request, the stream's retries, the result polls."""

    total: int
    stream_retries: int
    retries: int
    polls: int


def _summary(results: list[BatchResult], elapsed: float, http: _Requests, conc: int) -> None:
    errors = sum(1 for r in results if not r.ok)
    retries = http.retries  # counted by the client's "failure" event hook
    batch_retries = retries - http.stream_retries
    calls = 1 + len(results)
    latencies = sorted(r.latency for r in results)
    sample = next((r for r in results if r.ok), None)
    if sample is not None:
        print(f"\nsample: {sample.prompt!r} -> {sample.text!r}")
    # Every HTTP request is accounted for: one per call, one per retry, one per poll of a
    # 303 result URL (a generation that outlasts Modal's 150 s answers with a 303).
    parts = [
        f"{calls} calls (1 stream + {len(results)} prompts)",
        f"{retries} retries ({http.stream_retries} for the stream, {batch_retries} in the batch)",
    ]
    if http.polls:
        parts.append(f"{http.polls} result polls (GET after a 303)")
    other = http.total - calls - retries - http.polls
    if other:
        parts.append(f"{other} other")
    print("\nsummary")
    print(f"  HTTP requests: {http.total} = " + " + ".join(parts))
    if retries:
        print("                 (the endpoint injects 503s and 429s; the client retried them)")
    print(f"  errors:        {errors}")
    rate = len(results) / elapsed if elapsed > 0 else 0.0
    print(f"  throughput:    {rate:.0f} prompts/s ({elapsed:.2f} s, concurrency {conc})")
    p50, p95 = _percentile(latencies, 0.50), _percentile(latencies, 0.95)
    print(f"  latency:       p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
