"""Soak modal-llm under injected faults and check that nothing is lost, leaks or hangs.

Usage (from the repo root)::

    python -m benchmarks.soak                  # 50,000 requests (a few minutes)
    python -m benchmarks.soak --quick          # 3,000 requests, the in-suite size
    python benchmarks/soak.py --requests 200000 --json soak.json

One process runs the reference endpoint (``modal_llm.server``) behind the fault-injecting
TCP proxy (``modal_llm.testing.FaultProxy``), an ``AsyncClient`` that sends ``generate``,
``stream``, ``map`` and ``generate_many`` calls, and a blocking ``Client`` used from worker threads.
The proxy refuses, resets, stalls, cuts and delays exchanges; the endpoint answers 429
(``Retry-After: 0``), 500 and an opening burst of 503. The run is cut into ten segments;
after each one every call has ended and file descriptors, asyncio tasks and RSS are sampled.

Pass means (``SoakReport.checks``): every prompt ends with exactly one outcome, its correct
text or a typed ``ModalLLMError``; an error that the retry policy calls retryable only ends a
call once every retry was spent; each logical call used one ``Idempotency-Key``; fds, tasks
and RSS are flat from the first segment to the last; every concurrency slot and pooled
connection is back; no ``ResourceWarning``; at least 5 % of exchanges were faulted.
Bookkeeping is preallocated so that the harness itself does not grow while it measures.
Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import gc
import json
import os
import random
import sys
import threading
import time
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from modal_llm import (
    AsyncClient,
    AttemptEvent,
    BatchItem,
    Client,
    ConnectError,
    EndpointTimeoutError,
    ModalLLMError,
    RetryPolicy,
    StreamError,
    Timeout,
    is_retryable,
)
from modal_llm.server import STATS, ServerConfig, create_app, serve, toy_generate
from modal_llm.testing import FAULT_KINDS, FaultConfig, FaultProxy

__all__ = ["SoakConfig", "SoakReport", "main", "run_soak"]

KINDS: Final = ("generate", "stream", "map", "many", "sync_generate", "sync_stream")
SEGMENTS: Final = 10
PER_LINK: Final = 4
_UNSET, _TEXT, _ERROR = 0, 1, 2
_CURRENT: contextvars.ContextVar[int] = contextvars.ContextVar("soak_job", default=-1)
"""The job a task (or a blocking call's loop task) is running, for the failure listener."""


@dataclass(frozen=True)
class SoakConfig:
    """How big, how mixed and how faulty the run is."""

    requests: int = 50_000
    seed: int = 7
    mix: tuple[float, ...] = (0.30, 0.20, 0.20, 0.05, 0.15, 0.10)
    """Shares of ``KINDS``: generate, stream, map, generate_many, blocking generate/stream."""
    concurrency: int = 32
    async_workers: int = 24
    map_batch: int = 50
    many_batch: int = 20
    threads: int = 6
    max_retries: int = 4
    first_byte: float = 0.5
    read: float = 0.5
    # The proxy (per exchange) and the endpoint (per POST).
    refuse: float = 0.02
    reset: float = 0.02
    stall_before: float = 0.01
    stall_mid: float = 0.005
    cut: float = 0.01
    delay: float = 0.02
    rate_limit_rate: float = 0.02
    failure_rate: float = 0.02
    error_burst: int = 5
    doomed_every: int = 200
    """Every Nth call is answered 503 on every attempt: it must spend all its retries."""
    # Leak tolerances between the first segment's sample and later ones.
    fd_slack: int = 8
    task_slack: int = 8
    rss_slack_mb: float = 10.0

    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            max_retries=self.max_retries, wait_initial=0.001, wait_max=0.01, jitter=0.002
        )


@dataclass
class Sample:
    """Resources at a quiescent point: after a segment, with no call in flight.

    ``links`` is the number of proxied connections still open (idle in the clients' pools).
    Each one holds four fds (client, proxy in, proxy out, endpoint) and four tasks (three in
    the proxy, one in the endpoint), so ``fds - 4 * links`` is what must stay flat.
    """

    done: int
    seconds: float
    fds: int
    tasks: int
    rss_mb: float
    links: int = 0

    @property
    def net_fds(self) -> int:
        return self.fds - PER_LINK * self.links

    @property
    def net_tasks(self) -> int:
        return self.tasks - PER_LINK * self.links


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class SoakReport:
    """The figures of one run and the verdict of every check."""

    config: SoakConfig
    seconds: float = 0.0
    requests_by_kind: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    errors_by_type: dict[str, int] = field(default_factory=dict)
    proxy_faults: dict[str, int] = field(default_factory=dict)
    server: dict[str, int] = field(default_factory=dict)
    exchanges: int = 0
    faulted_exchanges: int = 0
    calls_with_failed_attempts: int = 0
    recovered: int = 0
    exhausted: int = 0
    final_errors: int = 0
    failed_attempts: int = 0
    samples: list[Sample] = field(default_factory=list)
    baseline: Sample | None = None
    after_teardown: Sample | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def prompt_of(job: int) -> str:
    return f"soak-{job} alpha{job % 7} beta{job % 3}"


def job_of(prompt: str) -> int:
    head = prompt.split(" ", 1)[0]
    return int(head[5:]) if head.startswith("soak-") and head[5:].isdigit() else -1


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: count what we can
        return -1


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Ledger:
    """Preallocated per-job bookkeeping, shared by the client side and the server side."""

    def __init__(self, n: int, doomed_every: int = 0) -> None:
        self.n = n
        self.doomed_every = doomed_every
        self.doomed_text = 0  # a doomed call that somehow produced text
        self.doomed_replies = 0  # 503s the ledger answered itself (the endpoint never saw them)
        self.outcome = bytearray(n)  # _UNSET, _TEXT, _ERROR
        self.double = 0  # a job that got a second outcome
        self.wrong_text: list[str] = []
        self.bad_partial: list[str] = []
        self.errors: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.retries_left: list[str] = []
        self.crashes: list[str] = []
        self.exhausted = 0
        self.exhausted_doomed = 0
        self.final_errors = 0
        self.client_failures = array("H", bytes(2 * n))  # failed attempts the client saw
        self.server_attempt = array("H", bytes(2 * n))  # highest attempt number seen
        self.server_faults = array("H", bytes(2 * n))  # 429/5xx the endpoint answered
        self.key_hash = array("q", bytes(8 * n))
        self.key_mismatch = 0
        self.attempt_overflow = 0
        self.kind = bytearray(n)
        self.lock = threading.Lock()

    def doomed(self, job: int) -> bool:
        return self.doomed_every > 0 and job % self.doomed_every == self.doomed_every - 1

    def text(self, job: int, text: str) -> None:
        with self.lock:
            if self.outcome[job] != _UNSET:
                self.double += 1
                return
            self.outcome[job] = _TEXT
            if self.doomed(job):
                self.doomed_text += 1
        if text != toy_generate(prompt_of(job)) and len(self.wrong_text) < 10:
            self.wrong_text.append(f"job {job}: {text!r}")

    def error(self, job: int, exc: BaseException, policy: RetryPolicy) -> None:
        with self.lock:
            if self.outcome[job] != _UNSET:
                self.double += 1
                return
            self.outcome[job] = _ERROR
            if not isinstance(exc, ModalLLMError):
                self.crashes.append(f"job {job}: {exc!r}")
                return
            self.errors[type(exc).__name__] += 1
            answer = toy_generate(prompt_of(job))
            if isinstance(exc, StreamError) and not answer.startswith(exc.partial_text):
                self.bad_partial.append(f"job {job}: {exc.partial_text!r}")
            if is_retryable(exc, policy):
                if exc.attempts == policy.max_retries + 1:
                    self.exhausted += 1
                    self.exhausted_doomed += self.doomed(job)
                elif len(self.retries_left) < 10:
                    self.retries_left.append(f"job {job}: {exc!r} (attempts={exc.attempts})")
                return
            self.final_errors += 1
            if not _expected_final(exc) and len(self.unexpected) < 10:
                self.unexpected.append(f"job {job}: {exc!r}")

    def failed_attempt(self, event: AttemptEvent) -> None:
        job = _CURRENT.get()
        if 0 <= job < self.n:
            self.client_failures[job] = min(self.client_failures[job] + 1, 65535)

    def server_saw(self, job: int, key: str, attempt: int) -> None:
        digest = hash(key) or 1
        if self.key_hash[job] == 0:
            self.key_hash[job] = digest
        elif self.key_hash[job] != digest:
            self.key_mismatch += 1
        if attempt > self.server_attempt[job]:
            self.server_attempt[job] = min(attempt, 65535)


def _expected_final(exc: ModalLLMError) -> bool:
    """Errors that end a call without retrying: the reply had already started."""
    if isinstance(exc, StreamError):
        return True
    if isinstance(exc, ConnectError):
        return not exc.before_response
    if isinstance(exc, EndpointTimeoutError):
        return exc.phase == "read"
    return False


_FAULT_STATUSES: Final = frozenset({429, 500, 503})


def _ledger_middleware(ledger: Ledger) -> Any:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key", "")
        try:
            attempt = int(request.headers.get("X-Modal-LLM-Attempt", "0"))
        except ValueError:
            attempt = 0
        job = -1
        if request.method == "POST":
            try:
                job = job_of(json.loads(await request.read())["prompt"])
            except (ValueError, KeyError, TypeError):
                job = -1
        if 0 <= job < ledger.n:
            ledger.server_saw(job, key, attempt)
            if ledger.doomed(job):
                ledger.server_faults[job] += 1
                ledger.doomed_replies += 1
                return web.Response(status=503, text="modal-http: doomed by the soak")
        response: web.StreamResponse = await handler(request)
        if 0 <= job < ledger.n and response.status in _FAULT_STATUSES:
            ledger.server_faults[job] += 1
        return response

    return record


class _WarningTrap:
    """Count ResourceWarnings and unraisable exceptions (``__del__`` complaining) in a run."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        previous_hook = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            self.seen.append(f"unraisable: {unraisable.exc_value!r} in {unraisable.object!r}")

        with warnings.catch_warnings():
            warnings.simplefilter("always", ResourceWarning)
            previous_show = warnings.showwarning

            def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
                if issubclass(category, ResourceWarning):
                    self.seen.append(f"{category.__name__}: {message}")
                else:
                    previous_show(message, category, *args, **kwargs)

            warnings.showwarning = show
            sys.unraisablehook = hook
            try:
                yield
            finally:
                gc.collect()
                sys.unraisablehook = previous_hook
                warnings.showwarning = previous_show


def _pool_state(client: AsyncClient | Client, concurrency: int) -> tuple[bool, str]:
    pool = client.pool
    free = pool.max_concurrency - pool.slots_in_use
    ok = free == concurrency and pool.connections_in_use == 0
    return ok, f"free slots {free}/{concurrency}, connections checked out {pool.connections_in_use}"


class _Run:
    """One soak: the endpoint, the proxy, both clients and the lanes that drive them."""

    def __init__(self, config: SoakConfig, progress: Callable[[str], None] | None) -> None:
        self.config = config
        self.progress = progress or (lambda _message: None)
        self.ledger = Ledger(config.requests, config.doomed_every)
        self.policy = config.retry()
        rng = random.Random(config.seed)
        kinds = rng.choices(range(len(KINDS)), weights=config.mix, k=config.requests)
        self.ledger.kind[:] = bytes(kinds)
        self.report = SoakReport(config)
        self.proxy: FaultProxy | None = None
        self.idle: Callable[[], int] = lambda: 0
        self.report.requests_by_kind = {
            name: kinds.count(index) for index, name in enumerate(KINDS)
        }

    async def run(self) -> SoakReport:
        config, report = self.config, self.report
        # Warm up what a loop keeps once used: the default executor, and (uvloop) libuv's
        # spare /dev/null fd, reserved for accept() running out of fds, once a server listens.
        await asyncio.to_thread(gc.collect)
        warm = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        warm.close()
        await warm.wait_closed()
        started = time.perf_counter()
        report.baseline = self._sample(0, started)
        trap = _WarningTrap()
        with trap.armed():
            await self._run_with_servers(started)
            gc.collect()
            report.after_teardown = self._sample(config.requests, started)
        report.seconds = time.perf_counter() - started
        self._judge(trap)
        return report

    async def _run_with_servers(self, started: float) -> None:
        config = self.config
        server_config = ServerConfig(
            pieces=4,
            rate_limit_rate=config.rate_limit_rate,
            retry_after="0",
            failure_rate=config.failure_rate,
            error_burst=config.error_burst,
            seed=config.seed,
        )
        app = create_app(server_config)
        app.middlewares.append(_ledger_middleware(self.ledger))
        faults = FaultConfig(
            refuse=config.refuse,
            reset=config.reset,
            stall_before=config.stall_before,
            stall_mid=config.stall_mid,
            cut=config.cut,
            delay=config.delay,
            seed=config.seed,
        )
        timeout = Timeout(connect=5.0, first_byte=config.first_byte, read=config.read)
        async with serve(app) as url:
            port = int(url.rsplit(":", 1)[1].strip("/"))
            async with FaultProxy("127.0.0.1", port, faults) as proxy:
                self.proxy = proxy
                hooks = {"failure": [self.ledger.failed_attempt]}
                client = AsyncClient(
                    proxy.url,
                    max_concurrency=config.concurrency,
                    retry=self.policy,
                    timeout=timeout,
                    event_hooks=hooks,
                )
                blocking = await asyncio.to_thread(
                    partial(
                        Client,
                        proxy.url,
                        max_concurrency=config.threads,
                        retry=self.policy,
                        timeout=timeout,
                        event_hooks=hooks,
                    )
                )
                self.idle = lambda: client.pool.connections_idle + blocking.pool.connections_idle
                try:
                    async with client:
                        await self._segments(client, blocking, started)
                        self._check_pools(client, blocking)
                finally:
                    await asyncio.to_thread(blocking.close)
                proxy.release()
                self._count_faults(proxy, app)
                self.proxy = None

    async def _segments(self, client: AsyncClient, blocking: Client, started: float) -> None:
        n = self.config.requests
        with ThreadPoolExecutor(self.config.threads, thread_name_prefix="soak") as pool:
            for segment in range(SEGMENTS):
                jobs = range(segment * n // SEGMENTS, (segment + 1) * n // SEGMENTS)
                await self._segment(client, blocking, pool, jobs)
                await self._settle()
                gc.collect()
                sample = self._sample(jobs.stop, started)
                self.report.samples.append(sample)
                self.progress(
                    f"{jobs.stop:>7}/{n} requests  {sample.seconds:6.1f}s  fds {sample.fds}  "
                    f"tasks {sample.tasks}  rss {sample.rss_mb:.1f} MB"
                )

    async def _segment(
        self, client: AsyncClient, blocking: Client, pool: ThreadPoolExecutor, jobs: range
    ) -> None:
        lanes: dict[str, list[int]] = {name: [] for name in KINDS}
        for job in jobs:
            lanes[KINDS[self.ledger.kind[job]]].append(job)
        single = sorted(lanes["generate"] + lanes["stream"])
        sync_jobs = sorted(lanes["sync_generate"] + lanes["sync_stream"])
        work: list[Any] = [self._singles(client, single)]
        work += [self._map(client, batch) for batch in _chunks(lanes["map"], self.config.map_batch)]
        work += [
            self._many(client, batch) for batch in _chunks(lanes["many"], self.config.many_batch)
        ]
        loop = asyncio.get_running_loop()
        source = iter(sync_jobs)
        lock = threading.Lock()
        work += [
            loop.run_in_executor(pool, self._sync_lane, blocking, source, lock)
            for _ in range(self.config.threads)
        ]
        await asyncio.gather(*work)

    async def _singles(self, client: AsyncClient, jobs: list[int]) -> None:
        source = iter(jobs)

        async def worker() -> None:
            for job in source:
                _CURRENT.set(job)
                prompt = prompt_of(job)
                try:
                    if KINDS[self.ledger.kind[job]] == "generate":
                        text = await client.generate(prompt)
                    else:
                        text = "".join([piece async for piece in client.stream(prompt)])
                except Exception as exc:
                    self.ledger.error(job, exc, self.policy)
                else:
                    self.ledger.text(job, text)
            _CURRENT.set(-1)

        await asyncio.gather(*(worker() for _ in range(self.config.async_workers)))

    async def _map(self, client: AsyncClient, jobs: list[int]) -> None:
        items = [BatchItem(prompt_of(job), id=job) for job in jobs]
        try:
            async for result in client.map(items, concurrency=8):
                job = jobs[result.index]
                if result.error is not None:
                    self.ledger.error(job, result.error, self.policy)
                else:
                    assert result.text is not None
                    self.ledger.text(job, result.text)
                    if result.attempts > 1:
                        self.ledger.client_failures[job] += result.attempts - 1
        except Exception as exc:  # the iterator itself failed: every item still owes one
            for job in jobs:
                if self.ledger.outcome[job] == _UNSET:
                    self.ledger.error(job, exc, self.policy)

    async def _many(self, client: AsyncClient, jobs: list[int]) -> None:
        try:
            results = await client.generate_many(
                [prompt_of(job) for job in jobs], return_exceptions=True
            )
        except Exception as exc:
            for job in jobs:
                self.ledger.error(job, exc, self.policy)
            return
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, str):
                self.ledger.text(job, result)
            else:
                self.ledger.error(job, result, self.policy)

    def _sync_lane(self, blocking: Client, source: Iterator[int], lock: threading.Lock) -> None:
        while True:
            with lock:
                job = next(source, None)
            if job is None:
                return
            _CURRENT.set(job)
            prompt = prompt_of(job)
            try:
                if KINDS[self.ledger.kind[job]] == "sync_generate":
                    text = blocking.generate(prompt)
                else:
                    text = "".join(blocking.stream(prompt))
            except Exception as exc:
                self.ledger.error(job, exc, self.policy)
            else:
                self.ledger.text(job, text)

    async def _settle(self) -> None:
        """Wait (briefly) until every proxied connection is one a client pool still holds."""
        proxy = self.proxy
        for _ in range(200):
            if proxy is None or proxy.open_connections <= self.idle():
                return
            await asyncio.sleep(0.01)

    def _sample(self, done: int, started: float) -> Sample:
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:
            tasks = 0
        links = 0 if self.proxy is None else self.proxy.open_connections
        seconds = time.perf_counter() - started
        return Sample(done, seconds, open_fds(), tasks, rss_mb(), links)

    def _check_pools(self, client: AsyncClient, blocking: Client) -> None:
        ok, detail = _pool_state(client, self.config.concurrency)
        self.report.checks.append(Check("AsyncClient slots and connections all back", ok, detail))
        sync_ok, sync_detail = _pool_state(blocking, self.config.threads)
        self.report.checks.append(
            Check("blocking Client slots and connections all back", sync_ok, sync_detail)
        )

    def _count_faults(self, proxy: FaultProxy, app: web.Application) -> None:
        report = self.report
        report.proxy_faults = {kind: proxy.counts.get(kind, 0) for kind in FAULT_KINDS}
        stats = app[STATS]
        report.server = {
            "requests": stats.requests,
            "posts": stats.posts,
            "disconnects": stats.disconnects,
            **{f"status {status}": count for status, count in sorted(stats.statuses.items())},
            "503 to doomed calls": self.ledger.doomed_replies,
        }
        server_faults = sum(stats.statuses.get(status, 0) for status in _FAULT_STATUSES)
        server_faults += self.ledger.doomed_replies
        report.exchanges = sum(proxy.counts.values())
        report.faulted_exchanges = report.exchanges - proxy.counts.get("none", 0) + server_faults
        report.checks.append(
            Check("the fault proxy ran without errors", not proxy.errors, repr(proxy.errors[:3]))
        )

    def _judge(self, trap: _WarningTrap) -> None:
        config, report, ledger = self.config, self.report, self.ledger
        n = config.requests
        texts = ledger.outcome.count(_TEXT)
        errors = ledger.outcome.count(_ERROR)
        unset = ledger.outcome.count(_UNSET)
        report.outcomes = {"text": texts, "typed error": errors - len(ledger.crashes)}
        report.errors_by_type = dict(ledger.errors.most_common())
        report.exhausted = ledger.exhausted
        report.final_errors = ledger.final_errors
        failed = 0
        recovered = 0
        attempts = 0
        for job in range(n):
            seen = max(ledger.client_failures[job], ledger.server_attempt[job] - 1)
            seen = max(seen, ledger.server_faults[job])
            attempts += seen
            if seen:
                failed += 1
                if ledger.outcome[job] == _TEXT:
                    recovered += 1
        report.calls_with_failed_attempts = failed
        report.recovered = recovered
        report.failed_attempts = attempts
        add = report.checks.append
        add(
            Check(
                "every prompt has exactly one outcome",
                unset == 0 and ledger.double == 0 and texts + errors == n,
                f"{texts} texts + {errors} errors of {n}; unset {unset}, doubled {ledger.double}",
            )
        )
        add(
            Check(
                "every text is the right one", not ledger.wrong_text, "; ".join(ledger.wrong_text)
            )
        )
        add(
            Check(
                "every partial stream text is a prefix of the answer",
                not ledger.bad_partial,
                "; ".join(ledger.bad_partial),
            )
        )
        add(Check("only ModalLLMError escapes", not ledger.crashes, "; ".join(ledger.crashes[:5])))
        add(
            Check(
                "a retryable failure ends a call only with no retry left",
                not ledger.retries_left,
                "; ".join(ledger.retries_left) or f"{ledger.exhausted} exhausted all retries",
            )
        )
        add(
            Check(
                "final errors are the non-retryable kinds (reply already started)",
                not ledger.unexpected,
                "; ".join(ledger.unexpected) or f"{ledger.final_errors} final errors",
            )
        )
        add(
            Check(
                "one Idempotency-Key per logical call, attempts within the policy",
                ledger.key_mismatch == 0
                and max(ledger.server_attempt, default=0) <= config.max_retries + 1,
                f"key changes {ledger.key_mismatch}, "
                f"highest attempt {max(ledger.server_attempt, default=0)}",
            )
        )
        add(Check("some calls recovered from faults", recovered > 0, f"{recovered} recovered"))
        doomed = sum(1 for job in range(n) if ledger.doomed(job))
        add(
            Check(
                "calls answered 503 on every attempt spent every retry, then failed",
                ledger.doomed_text == 0 and (doomed == 0 or ledger.exhausted > 0),
                f"{doomed} doomed calls, {ledger.doomed_text} gave text, "
                f"{ledger.exhausted_doomed} of them exhausted their retries "
                f"({ledger.exhausted} calls in all)",
            )
        )
        share = report.faulted_exchanges / max(1, report.exchanges)
        add(
            Check(
                "at least 5 % of exchanges faulted",
                share >= 0.05,
                f"{report.faulted_exchanges}/{report.exchanges} = {share:.1%}",
            )
        )
        self._judge_leaks()
        add(Check("no ResourceWarning or unraisable error", not trap.seen, "; ".join(trap.seen)))

    def _judge_leaks(self) -> None:
        config, report = self.config, self.report
        add = report.checks.append
        samples = report.samples
        if not samples:
            add(Check("resources sampled", False, "no sample"))
            return
        first, last = samples[0], samples[-1]
        peak_fds = max(s.net_fds for s in samples)
        peak_tasks = max(s.net_tasks for s in samples)
        peak_rss = max(s.rss_mb for s in samples)
        add(
            Check(
                "open fds flat from 10 % to the end",
                peak_fds <= first.net_fds + config.fd_slack,
                f"{first.fds} at 10 %, {last.fds} at the end ({first.links} and {last.links} "
                f"pooled connections); net of those {first.net_fds}, {last.net_fds}, "
                f"peak {peak_fds} (slack {config.fd_slack})",
            )
        )
        add(
            Check(
                "asyncio tasks flat from 10 % to the end",
                peak_tasks <= first.net_tasks + config.task_slack,
                f"{first.tasks} at 10 %, {last.tasks} at the end; net of pooled connections "
                f"{first.net_tasks}, {last.net_tasks}, peak {peak_tasks}",
            )
        )
        add(
            Check(
                "RSS flat from 10 % to the end",
                peak_rss <= first.rss_mb + config.rss_slack_mb,
                f"{first.rss_mb:.1f} MB at 10 %, {last.rss_mb:.1f} MB at the end, "
                f"peak {peak_rss:.1f} MB (slack {config.rss_slack_mb:g} MB)",
            )
        )
        base, after = report.baseline, report.after_teardown
        if base is not None and after is not None and base.fds >= 0:
            add(
                Check(
                    "every fd closed after teardown",
                    after.fds <= base.fds,
                    f"{base.fds} before, {after.fds} after",
                )
            )


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def run_soak(config: SoakConfig, progress: Callable[[str], None] | None = None) -> SoakReport:
    """Run one soak in the running loop; ``progress`` gets a line per segment."""
    return await _Run(config, progress).run()


# -- the command line ----------------------------------------------------------------------------


def render(report: SoakReport) -> str:
    """The report as Markdown (what docs/reliability.md quotes)."""
    config = report.config
    lines = [
        f"- requests: {config.requests:,} in {report.seconds:.1f} s "
        f"({config.requests / max(report.seconds, 1e-9):,.0f}/s), seed {config.seed}",
        "- by kind: " + ", ".join(f"{k} {v:,}" for k, v in report.requests_by_kind.items()),
        f"- HTTP exchanges through the proxy: {report.exchanges:,}, faulted: "
        f"{report.faulted_exchanges:,} ({report.faulted_exchanges / max(1, report.exchanges):.1%})",
        "- proxy faults: "
        + ", ".join(f"{k} {v:,}" for k, v in report.proxy_faults.items() if k != "none"),
        "- endpoint: " + ", ".join(f"{k} {v:,}" for k, v in report.server.items()),
        f"- outcomes: {report.outcomes.get('text', 0):,} correct texts, "
        f"{report.outcomes.get('typed error', 0):,} typed errors",
        "- errors: "
        + (", ".join(f"{k} {v:,}" for k, v in report.errors_by_type.items()) or "none"),
        f"- calls that met a failed attempt: {report.calls_with_failed_attempts:,}; "
        f"recovered: {report.recovered:,}; retries exhausted: {report.exhausted:,}; "
        f"final (reply already started): {report.final_errors:,}",
    ]
    if report.baseline and report.samples and report.after_teardown:
        first, last = report.samples[0], report.samples[-1]
        lines.append(
            f"- fds: {report.baseline.fds} at start, {first.fds} at 10 %, {last.fds} at the end, "
            f"{report.after_teardown.fds} after teardown"
        )
        lines.append(f"- asyncio tasks: {first.tasks} at 10 %, {last.tasks} at the end")
        lines.append(
            f"- RSS: {report.baseline.rss_mb:.1f} MB at start, {first.rss_mb:.1f} MB at 10 %, "
            f"{last.rss_mb:.1f} MB at the end"
        )
    lines.append("")
    lines.append("| check | result | detail |")
    lines.append("| --- | --- | --- |")
    for check in report.checks:
        detail = check.detail.replace("|", "\\|")
        lines.append(f"| {check.name} | {'pass' if check.ok else 'FAIL'} | {detail} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Soak modal-llm through a fault-injecting proxy and check for lost "
        "prompts, leaks and hangs.",
    )
    parser.add_argument("--requests", type=int, default=50_000, help="default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="3,000 requests (the in-suite size)")
    parser.add_argument("--seed", type=int, default=7, help="default: %(default)s")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop if installed")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = 3_000
    if args.requests < SEGMENTS:
        parser.error(f"--requests must be at least {SEGMENTS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = SoakConfig(requests=args.requests, seed=args.seed)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    coro = run_soak(config, progress)
    if args.uvloop:
        import uvloop

        report = uvloop.run(coro)
    else:
        report = asyncio.run(coro)
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
