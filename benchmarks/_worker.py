"""One measured run of one client, in its own process; prints one JSON line of results.

Usage: ``python -m benchmarks._worker '{"client": "aiohttp", "mode": "batch", ...}'``

Parameters: client, mode ("batch", "stream" or "streams"), url, concurrency, and for batch
runs n, warmup, prompts ("fixed" or "distinct") and inputs ("generator", the default: a lazy
generator consumed inside the measured phase; or "list": a list of the n prompts built and
touched before the memory baseline, the same object for every client, as the memory
workload does: the caller's inputs are the caller's memory, not the client's); for stream
runs streams, warmup_streams and pieces; for open-streams runs (workload 6) streams, pieces
and ramp_s (stream i starts i × ramp_s / streams seconds in); optionally profile (a path for
cProfile stats). The CPU time (all threads) and wall time cover the measured phase only;
memory is the peak RSS above the baseline taken after imports (and after the input list or,
for open-streams runs, the delay array is allocated).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import importlib
import itertools
import json
import logging
import math
import resource
import statistics
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from benchmarks._clients import (
    CLIENTS,
    NOTES,
    STREAM_PROMPT_FILLER,
    THROUGHPUT_PROMPT,
    ClientSpec,
    Unavailable,
)

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterable, Iterator


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM so import-time peaks do not count (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _peak_rss_kb() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _prompts(kind: str, n: int) -> Iterator[str]:
    if kind == "fixed":
        return itertools.repeat(THROUGHPUT_PROMPT, n)
    return (f"prompt {i}: write one sentence about the number {i}." for i in range(n))


def _inputs(p: dict[str, Any], made: list[str] | None) -> Iterable[str]:
    """The measured phase's prompts: the list made before the baseline, else a generator."""
    return made if made is not None else _prompts(p["prompts"], p["n"])


def _raise_nofile(needed: int) -> None:
    """Raise RLIMIT_NOFILE to its hard limit; fail early if that cannot cover ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise RuntimeError(f"RLIMIT_NOFILE is {soft}, {needed} file descriptors are needed")


def _run_loop(coro: Coroutine[Any, Any, dict[str, Any]], loop_name: str) -> dict[str, Any]:
    loop: asyncio.AbstractEventLoop
    if loop_name == "modal_llm.run":
        import modal_llm

        run = getattr(modal_llm, "run", None)
        if run is None:
            coro.close()
            raise Unavailable("modal_llm.run is not available yet")
        result: dict[str, Any] = run(coro, uvloop=True)
        return result
    if loop_name == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        asyncio.set_event_loop(None)
        loop.close()


@contextlib.contextmanager
def _profiled(path: str | None) -> Iterator[None]:
    """cProfile the measured phase into ``path`` (the calling thread only)."""
    if not path:
        yield
        return
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(path)


class _Clock:
    """Wall and CPU time of the measured phase."""

    def __enter__(self) -> _Clock:
        self.cpu0 = time.process_time()
        self.wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def _batch_result(clock: _Clock, count: int, n: int) -> dict[str, Any]:
    if count != n:
        raise RuntimeError(f"{count} good replies out of {n}")
    return {
        "count": n,
        "wall_s": clock.wall,
        "cpu_s": clock.cpu,
        "rps": n / clock.wall,
        "cpu_us_per_req": clock.cpu / n * 1e6,
    }


async def _batch_async(
    spec: ClientSpec, p: dict[str, Any], made: list[str] | None
) -> dict[str, Any]:
    assert spec.batch_async is not None
    async with spec.batch_async(p["url"], p["concurrency"]) as run:
        if p["warmup"]:
            await run(_prompts(p["prompts"], p["warmup"]))
        with _Clock() as clock, _profiled(p.get("profile")):
            count = await run(_inputs(p, made))
    return _batch_result(clock, count, p["n"])


def _batch_sync(spec: ClientSpec, p: dict[str, Any], made: list[str] | None) -> dict[str, Any]:
    assert spec.batch_sync is not None
    with spec.batch_sync(p["url"], p["concurrency"]) as run:
        if p["warmup"]:
            run(_prompts(p["prompts"], p["warmup"]))
        with _Clock() as clock, _profiled(p.get("profile")):
            count = run(_inputs(p, made))
    return _batch_result(clock, count, p["n"])


async def _stream(spec: ClientSpec, p: dict[str, Any]) -> dict[str, Any]:
    assert spec.stream is not None
    streams = p["streams"]
    async with spec.stream(p["url"], p["concurrency"]) as run:
        if p["warmup_streams"]:
            await asyncio.gather(
                *(run(f"warm {i}: {STREAM_PROMPT_FILLER}") for i in range(p["warmup_streams"]))
            )
        with _Clock() as clock, _profiled(p.get("profile")):
            outcomes = await asyncio.gather(
                *(run(f"stream {i}: {STREAM_PROMPT_FILLER}") for i in range(streams))
            )
    pieces = sum(n for _, n in outcomes)
    expected = streams * p["pieces"]
    if pieces != expected:
        raise RuntimeError(f"{pieces} pieces received, expected {expected}")
    firsts = sorted(first * 1e3 for first, _ in outcomes if not math.isnan(first))
    return {
        "count": pieces,
        "wall_s": clock.wall,
        "cpu_s": clock.cpu,
        "cpu_us_per_piece": clock.cpu / pieces * 1e6,
        "ttfp_ms": statistics.median(firsts),
        "ttfp_p95_ms": firsts[min(len(firsts) - 1, math.ceil(0.95 * len(firsts)) - 1)],
    }


async def _open_streams(
    spec: ClientSpec, p: dict[str, Any], delays: array.array[int]
) -> dict[str, Any]:
    """Workload 6: ``streams`` streams open at once, each storing its pieces' delays."""
    assert spec.timed_stream is not None
    streams, pieces, ramp = p["streams"], p["pieces"], p["ramp_s"]
    open_now = 0
    most_open = 0

    async def one(i: int) -> int:
        nonlocal open_now, most_open
        await asyncio.sleep(i * ramp / streams)
        open_now += 1
        most_open = max(most_open, open_now)
        try:
            return await run(f"stream {i}", delays, i * pieces)
        finally:
            open_now -= 1

    async with spec.timed_stream(p["url"], streams) as run:
        with _Clock() as clock, _profiled(p.get("profile")):
            outcomes = await asyncio.gather(
                *(one(i) for i in range(streams)), return_exceptions=True
            )
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        first = errors[0]
        raise RuntimeError(f"{len(errors)} of {streams} streams failed, first: {first!r}"[:300])
    received = sum(o for o in outcomes if isinstance(o, int))
    expected = streams * pieces
    if received != expected:
        raise RuntimeError(f"{received} pieces received, expected {expected}")
    return {
        "count": received,
        "wall_s": clock.wall,
        "cpu_s": clock.cpu,
        "cpu_us_per_piece": clock.cpu / received * 1e6,
        "pieces_per_s": received / clock.wall,
        "most_open": most_open,
    }


def _delay_stats(delays: array.array[int]) -> dict[str, float]:
    """Delivery delay percentiles in ms (computed after the peak RSS was read)."""
    ordered = sorted(delays)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1e6

    return {
        "delay_p50_ms": pct(0.50),
        "delay_p90_ms": pct(0.90),
        "delay_p99_ms": pct(0.99),
        "delay_max_ms": ordered[-1] / 1e6,
        "delay_mean_ms": sum(ordered) / n / 1e6,
    }


def measure(p: dict[str, Any]) -> dict[str, Any]:
    """Import the client's modules, take the memory baseline, then run the workload."""
    spec = CLIENTS[p["client"]]
    try:
        for module in spec.imports:
            importlib.import_module(module)
    except ImportError as exc:
        if spec.family == "modal-llm":
            raise Unavailable(f"import {exc.name or module} failed: {exc}") from exc
        raise
    delays: array.array[int] | None = None
    if p["mode"] == "streams":
        if spec.timed_stream is None:
            raise Unavailable(f"{spec.name} has no timed-stream runner")
        _raise_nofile(p["streams"] + 256)
        # Allocated (and touched) before the baseline, so it does not count as the client's.
        delays = array.array("q", bytes(8 * p["streams"] * p["pieces"]))
    made: list[str] | None = None
    if p["mode"] == "batch" and p.get("inputs") == "list":
        # The caller's inputs, built (every string touched) before the baseline like the
        # delay array: the same list for every client, so none is charged for holding it.
        made = list(_prompts(p["prompts"], p["n"]))
    gc.collect()
    baseline_kb = _status_kb("VmRSS") or _peak_rss_kb()
    hwm_reset = _reset_peak_rss()
    if delays is not None:
        result = _run_loop(_open_streams(spec, p, delays), spec.loop)
    elif p["mode"] == "stream":
        result = _run_loop(_stream(spec, p), spec.loop)
    elif spec.batch_async is not None:
        result = _run_loop(_batch_async(spec, p, made), spec.loop)
    else:
        result = _batch_sync(spec, p, made)
    peak_kb = _peak_rss_kb()
    result.update(
        rss_baseline_mb=baseline_kb / 1024,
        rss_peak_mb=peak_kb / 1024,
        rss_delta_mb=(peak_kb - baseline_kb) / 1024,
        rss_peak_reset=hwm_reset,
        inputs="list" if made is not None else "generator",
    )
    if delays is not None:
        result["rss_kb_per_stream"] = (peak_kb - baseline_kb) / p["streams"]
        result.update(_delay_stats(delays))
    return result


def main() -> None:
    params: dict[str, Any] = json.loads(sys.argv[1])
    # Default client settings per the issue: logging at WARNING.
    logging.basicConfig(level=logging.WARNING)
    try:
        out: dict[str, Any] = {"ok": True, **measure(params)}
    except Unavailable as exc:
        out = {"ok": False, "status": "unavailable", "reason": str(exc)}
    except Exception as exc:
        tail = traceback.format_exc().strip().splitlines()[-6:]
        out = {
            "ok": False,
            "status": "error",
            "reason": f"{type(exc).__name__}: {exc}"[:300],
            "trace": tail,
        }
    out["notes"] = NOTES
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
