"""The plan of a benchmark run and the loop that carries it out, one worker process per run.

Within each round every client runs once per case, in the same order (reversed on odd
rounds so no client always goes first); ratios are later taken between runs of one round.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from benchmarks._clients import CLIENTS
from benchmarks._servers import ROOT, Servers

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

T = TypeVar("T")

WORKLOADS = ("throughput", "fanout", "memory", "stream", "import", "streams")
WORKLOAD_ALIASES = {str(i): name for i, name in enumerate(WORKLOADS, start=1)}

DEFAULT_CLIENTS: dict[str, tuple[str, ...]] = {
    "throughput": (
        "aiohttp",
        "httpx",
        "requests",
        "incumbent",
        "mllm-many",
        "mllm-generate",
        "mllm-map",
        "mllm-map-ordered",
        "mllm-sync",
        "mllm-langchain",
        "mllm-langchain-config",
        "mllm-chat",
        "mllm-many-uvloop",
    ),
    "fanout": (
        "aiohttp",
        "httpx",
        "requests",
        "incumbent",
        "mllm-many",
        "mllm-generate",
        "mllm-map",
        "mllm-map-ordered",
        "mllm-sync",
        "mllm-langchain",
        "mllm-langchain-config",
        "mllm-chat",
    ),
    "memory": (
        "aiohttp",
        "mllm-many",
        "mllm-map",
        "mllm-langchain",
        "mllm-langchain-ascompleted",
        "mllm-chat",
        "mllm-chat-ascompleted",
    ),
    "stream": ("aiohttp", "mllm-stream"),
    "streams": ("aiohttp", "mllm-stream"),
}

# First-round request counts relative to the plan's, for peers far slower than the ceiling.
# Later runs size themselves from the last rate measured (see Runner._throughput_n).
THROUGHPUT_SCALE = {
    "httpx": 0.1,
    "requests": 0.3,
    "incumbent": 0.1,
    "incumbent-batch": 0.1,
}

# What `import modal_llm` must not pull in (issue 6), checked in a fresh interpreter.
FORBIDDEN_PREFIXES = ("langchain", "tqdm", "modal_llm.server")
IMPORT_CASES = {
    "python -c pass": "pass",
    "aiohttp": "import aiohttp",
    "modal_llm": "import modal_llm",
    # What import defers to the first client (pydantic-core, the version for User-Agent).
    "modal_llm + AsyncClient(url)": "import modal_llm; modal_llm.AsyncClient('http://127.0.0.1:9/')",
    "modal_llm + modal_llm.langchain": "import modal_llm, modal_llm.langchain",
    "langchain_community Modal": "from langchain_community.llms import Modal",
}
IMPORT_CASE = "fresh interpreter"
IMPORT_PROBE = """\
import json, sys, time
t0 = time.perf_counter()
try:
    exec(compile(sys.argv[1], "<bench>", "exec"))
    error = None
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
ms = (time.perf_counter() - t0) * 1e3
forbidden = sorted(m for m in sys.modules if m.startswith(tuple(sys.argv[2].split(","))))
info = {m: m in sys.modules for m in ("pydantic", "tenacity", "orjson", "uvloop", "yarl")}
print(json.dumps({"ms": ms, "modules": len(sys.modules), "forbidden": forbidden,
                  "loaded": info, "error": error}))
"""


@dataclass(frozen=True)
class Plan:
    """Every size and count of one benchmark run; ``quick()`` and ``full()`` are the presets."""

    mode: str
    rounds: int
    workloads: tuple[str, ...] = WORKLOADS
    only: tuple[str, ...] | None = None
    concurrencies: tuple[int, ...] = (1, 64, 256)
    throughput_n: int = 10_000
    throughput_n_c1: int = 3_000
    throughput_target_s: float = 2.0
    warmup: int = 500
    fanout_prompts: int = 512
    fanout_concurrency: int = 64
    fanout_latency: float = 0.1
    incumbent_fanout_rounds: int = 1
    memory_sizes: tuple[int, ...] = (10_000, 100_000)
    memory_concurrency: int = 64
    memory_rounds: int = 2
    streams: int = 64
    stream_pieces: int = 200
    stream_piece_delay: float = 0.005
    # Workload 6, thousands of open streams: each stream's pieces come piece_delay apart;
    # stream i starts i × ramp / streams seconds in, so all are open at once after the ramp.
    open_streams: tuple[int, ...] = (500, 2_000, 5_000)
    open_stream_pieces: int = 100
    open_stream_piece_delay: float = 0.05
    open_stream_ramp_s: float = 2.0
    # "workload:client" pairs left out of the defaults (quick: too slow for a smoke).
    skipped: tuple[str, ...] = ()
    import_reps: int = 7
    pin: bool = True
    use_nginx: bool = True
    latency_server: str = "auto"
    timeout: float = 300.0
    profile_dir: str | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> Plan:
        """The CI smoke: every workload and client once, small sizes, under two minutes."""
        values: dict[str, Any] = {
            "mode": "quick",
            "rounds": 1,
            "throughput_n": 1_500,
            "throughput_n_c1": 400,
            "throughput_target_s": 0.4,
            "warmup": 100,
            "fanout_prompts": 128,
            "memory_sizes": (2_000, 20_000),
            "memory_rounds": 1,
            "import_reps": 2,
            "open_streams": (50,),
            "open_stream_pieces": 10,
            "open_stream_piece_delay": 0.01,
            "open_stream_ramp_s": 0.1,
            "skipped": ("memory:mllm-langchain", "memory:mllm-chat"),
            "timeout": 120.0,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def full(cls, **overrides: Any) -> Plan:
        """The measurement behind docs/benchmarks.md: about ten minutes on two cores."""
        values: dict[str, Any] = {"mode": "full", "rounds": 3}
        values.update(overrides)
        return cls(**values)

    def clients_for(self, workload: str) -> list[str]:
        """The workload's clients: its defaults, or every ``--only`` client that can run it."""
        if self.only is None:
            return [c for c in DEFAULT_CLIENTS[workload] if f"{workload}:{c}" not in self.skipped]
        wanted = []
        for name in self.only:
            spec = CLIENTS[name]
            runs = {
                "stream": spec.stream is not None,
                "streams": spec.timed_stream is not None,
            }.get(workload, spec.batch_async is not None or spec.batch_sync is not None)
            if runs:
                wanted.append(name)
        return wanted


@dataclass
class Record:
    """One worker run: which workload, case, round and client, with what it measured."""

    workload: str
    case: str
    round: int
    client: str
    params: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)


def _cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """Servers on the first CPU, workers on the last, when there are two or more."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[-1]}


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _import_env() -> dict[str, str]:
    """The workers' environment, with bytecode caching on: under PYTHONDONTWRITEBYTECODE
    (set in some shells and containers) the untimed pass writes no .pyc, so every timed
    ``import modal_llm`` compiled our source while ``import aiohttp`` loaded the .pyc
    that pip wrote at install. An installed modal-llm has its .pyc too."""
    env = _worker_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_worker(params: dict[str, Any], cpus: set[int] | None, timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks._worker", json.dumps(params)]
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=_worker_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "status": "error", "reason": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = proc.stderr.strip()[-400:]
        return {"ok": False, "status": "error", "reason": f"exit {proc.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class Runner:
    """Carries out a plan against servers, collecting records and reporting progress."""

    def __init__(self, plan: Plan, log: Callable[[str], None]) -> None:
        self.plan = plan
        self.log = log
        self.server_cpus, self.worker_cpus = _cpu_split(plan.pin)
        self.records: list[Record] = []
        self.servers_used: dict[str, str] = {}
        self.notes: list[str] = []
        self.import_profile: list[dict[str, Any]] = []
        self._rates: dict[tuple[str, int], float] = {}

    def _order(self, items: Sequence[T], rnd: int) -> list[T]:
        return list(items) if rnd % 2 == 0 else list(reversed(items))

    def _run(self, record: Record) -> None:
        if self.plan.profile_dir:
            name = f"{record.workload}-{record.case}-{record.client}-r{record.round + 1}.prof"
            record.params["profile"] = str(Path(self.plan.profile_dir) / name.replace("=", ""))
        record.result = run_worker(
            {"client": record.client, **record.params}, self.worker_cpus, self.plan.timeout
        )
        self.records.append(record)
        if record.workload == "throughput" and record.result.get("ok"):
            self._rates[record.client, record.params["concurrency"]] = record.result["rps"]
        self.log(f"  [{record.workload} {record.case} r{record.round + 1}] "
                 f"{record.client}: {_brief(record)}")  # fmt: skip

    def run(self) -> list[Record]:
        with Servers(
            use_nginx=self.plan.use_nginx,
            latency_server=self.plan.latency_server,
            server_cpus=self.server_cpus,
            log=self.log,
        ) as servers:
            for workload in self.plan.workloads:
                started = time.monotonic()
                self.log(f"== {workload}")
                getattr(self, f"_{workload}")(servers)
                self.log(f"== {workload} took {time.monotonic() - started:.1f} s")
            self.notes = list(servers.notes)
        return self.records

    def _throughput(self, servers: Servers) -> None:
        server = servers.cpu_server()
        self.servers_used["throughput"] = server.kind
        clients = self.plan.clients_for("throughput")
        for rnd in range(self.plan.rounds):
            for conc in self.plan.concurrencies:
                for client in self._order(clients, rnd):
                    n = self._throughput_n(client, conc)
                    params = {
                        "mode": "batch",
                        "url": server.url,
                        "concurrency": conc,
                        "n": n,
                        "warmup": min(max(self.plan.warmup, conc), n),
                        "prompts": "fixed",
                    }
                    self._run(Record("throughput", f"c={conc}", rnd, client, params))

    def _throughput_n(self, client: str, conc: int) -> int:
        """The plan's count, cut so that a slow client's run lasts about the target time.

        The rate comes from this client's last run at this concurrency, else at any other.
        Never fewer than two waves of the concurrency: a rate needs a steady state.
        """
        plan_n = self.plan.throughput_n_c1 if conc == 1 else self.plan.throughput_n
        floor = max(100, 2 * conc)
        rate = self._rates.get((client, conc))
        if rate is None:
            known = [r for (c, _), r in self._rates.items() if c == client]
            rate = min(known) if known else None
        if rate is None:
            n = plan_n * THROUGHPUT_SCALE.get(client, 1.0)
        else:
            n = min(plan_n, rate * self.plan.throughput_target_s)
        return max(floor, round(n))

    def _fanout(self, servers: Servers) -> None:
        server = servers.latency_server(self.plan.fanout_latency)
        self.servers_used["fanout"] = server.kind
        clients = self.plan.clients_for("fanout")
        for rnd in range(self.plan.rounds):
            for client in self._order(clients, rnd):
                if client.startswith("incumbent") and rnd >= self.plan.incumbent_fanout_rounds:
                    continue
                params = {
                    "mode": "batch",
                    "url": server.url,
                    "concurrency": self.plan.fanout_concurrency,
                    "n": self.plan.fanout_prompts,
                    "warmup": 0,
                    "prompts": "distinct",
                    "latency": self.plan.fanout_latency,
                }
                self._run(Record("fanout", f"n={self.plan.fanout_prompts}", rnd, client, params))

    def _memory(self, servers: Servers) -> None:
        server = servers.cpu_server()
        self.servers_used["memory"] = server.kind
        clients = self.plan.clients_for("memory")
        for rnd in range(min(self.plan.rounds, self.plan.memory_rounds)):
            for size in self.plan.memory_sizes:
                for client in self._order(clients, rnd):
                    params = {
                        "mode": "batch",
                        "url": server.url,
                        "concurrency": self.plan.memory_concurrency,
                        "n": size,
                        "warmup": 0,
                        "prompts": "distinct",
                        # Every client gets the same list, made before the memory baseline.
                        "inputs": "list",
                    }
                    self._run(Record("memory", f"n={size}", rnd, client, params))

    def _stream(self, servers: Servers) -> None:
        server = servers.latency_server(
            0.0,
            pieces=self.plan.stream_pieces,
            piece_delay=self.plan.stream_piece_delay,
            stream=True,
        )
        self.servers_used["stream"] = server.kind
        clients = self.plan.clients_for("stream")
        case = f"{self.plan.streams}x{self.plan.stream_pieces}"
        for rnd in range(self.plan.rounds):
            for client in self._order(clients, rnd):
                params = {
                    "mode": "stream",
                    "url": server.url,
                    "concurrency": self.plan.streams,
                    "streams": self.plan.streams,
                    "warmup_streams": self.plan.streams,
                    "pieces": self.plan.stream_pieces,
                }
                self._run(Record("stream", case, rnd, client, params))

    def _streams(self, servers: Servers) -> None:
        plan = self.plan
        server = servers.sse_server(plan.open_stream_pieces, plan.open_stream_piece_delay)
        self.servers_used["streams"] = server.kind
        clients = self.plan.clients_for("streams")
        for rnd in range(plan.rounds):
            for streams in plan.open_streams:
                for client in self._order(clients, rnd):
                    params = {
                        "mode": "streams",
                        "url": server.url,
                        "concurrency": streams,
                        "streams": streams,
                        "pieces": plan.open_stream_pieces,
                        "piece_delay": plan.open_stream_piece_delay,
                        "ramp_s": plan.open_stream_ramp_s,
                    }
                    self._run(Record("streams", f"{streams} streams", rnd, client, params))

    def _import(self, servers: Servers) -> None:
        del servers
        forbidden = ",".join(FORBIDDEN_PREFIXES)
        cases = list(IMPORT_CASES.items())
        # One untimed pass first so every .pyc exists before anything is timed.
        for rnd in range(-1, self.plan.import_reps):
            for case, stmt in self._order(cases, max(rnd, 0)):
                cmd = [sys.executable, "-c", IMPORT_PROBE, stmt, forbidden]
                proc = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    env=_import_env(),
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=self.plan.timeout,
                )
                if rnd < 0:
                    continue
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                result: dict[str, Any]
                if lines:
                    result = json.loads(lines[-1])
                    result["ok"] = result["error"] is None
                    if result["error"]:
                        result.update(status="unavailable", reason=result["error"])
                else:
                    result = {"ok": False, "status": "error", "reason": proc.stderr[-300:]}
                record = Record("import", IMPORT_CASE, rnd, case, {"statement": stmt}, result)
                self.records.append(record)
        self.import_profile = import_profile()
        for case in IMPORT_CASES:
            ms = [
                r.result["ms"]
                for r in self.records
                if r.workload == "import" and r.client == case and r.result.get("ok")
            ]
            if ms:
                self.log(f"  [import] {case}: {sorted(ms)[len(ms) // 2]:.1f} ms")


_IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_profile(top: int = 10) -> list[dict[str, Any]]:
    """Modules that ``import modal_llm`` loads beyond ``import aiohttp``, heaviest first."""

    def modules(stmt: str) -> dict[str, tuple[int, int]]:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", stmt],
            cwd=ROOT,
            env=_import_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        found = {}
        for match in _IMPORTTIME.finditer(proc.stderr):
            found[match.group(4)] = (int(match.group(1)), int(match.group(2)))
        return found

    base = modules("import aiohttp")
    extra = {k: v for k, v in modules("import modal_llm").items() if k not in base}
    heaviest = sorted(extra.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    return [{"module": k, "self_ms": s / 1e3, "cumulative_ms": c / 1e3} for k, (s, c) in heaviest]


def _brief(record: Record) -> str:
    r = record.result
    if not r.get("ok"):
        return f"{r.get('status', 'error')}: {r.get('reason', '?')}"
    if record.workload == "throughput":
        return f"{r['rps']:.0f} req/s, {r['cpu_us_per_req']:.1f} µs CPU/req"
    if record.workload == "fanout":
        ideal = (
            math.ceil(record.params["n"] / record.params["concurrency"]) * record.params["latency"]
        )
        return f"{r['wall_s']:.2f} s ({r['wall_s'] / ideal:.2f}× ideal)"
    if record.workload == "memory":
        return f"+{r['rss_delta_mb']:.1f} MB peak RSS, {r['rps']:.0f} req/s"
    if record.workload == "stream":
        return f"{r['cpu_us_per_piece']:.1f} µs CPU/piece, first piece {r['ttfp_ms']:.1f} ms"
    if record.workload == "streams":
        return (
            f"{r['cpu_us_per_piece']:.1f} µs CPU/piece, {r['rss_kb_per_stream']:.1f} KB/stream, "
            f"delay p50 {r['delay_p50_ms']:.2f} ms p99 {r['delay_p99_ms']:.1f} ms"
        )
    return ""


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data for the results file."""
    return asdict(plan)
