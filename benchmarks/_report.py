"""Turn run records into medians, same-round ratios, target verdicts, text tables and a plot."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from benchmarks._clients import CLIENTS
from benchmarks._servers import ROOT

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

BASELINE = "aiohttp"

# Issue 17's targets, plus issue 6's where issue 17 asks only for "no regression".
# IMPORT_MAX_RATIO and MEMORY_FLAT_MB are ours, neither issue gives a figure.
# Throughput, concurrency 64 and 256: client -> (min req/s ×raw, max CPU/request ×raw, issue).
THROUGHPUT_TARGETS: dict[str, tuple[float, float | None, str]] = {
    "mllm-many": (0.90, 1.10, "6, no regression"),
    "mllm-generate": (0.95, 1.10, "17"),
    "mllm-map": (0.95, 1.10, "17"),
    "mllm-map-ordered": (0.95, 1.10, "17"),
    "mllm-sync": (0.80, None, "17"),
    "mllm-many-uvloop": (1.20, None, "17"),
}
# LangChain rows (the `lc` helper's): any client named mllm-langchain* or mllm-chat*.
LANGCHAIN_PREFIXES = ("mllm-langchain", "mllm-chat")
LANGCHAIN_MIN_RATIO = 0.75
TARGET_CASES = ("c=64", "c=256")
FANOUT_MAX_X_IDEAL = 1.3
LANGCHAIN_FANOUT_MAX_X_IDEAL = 1.2
ABATCH_MIN_SPEEDUP = 55.0
MEMORY_MAX_MB = 20.0
MEMORY_FLAT_MB = 5.0
LANGCHAIN_MEMORY_MAX_X_MANY = 1.5
STREAM_MAX_RATIO = 1.2
IMPORT_MAX_RATIO = 1.25
# Workload 6 (thousands of open streams), judged at OPEN_STREAMS_CASE, reported at all sizes.
OPEN_STREAMS_CASE = "2000 streams"
OPEN_STREAMS_CPU_MAX_RATIO = 1.10
OPEN_STREAMS_MEM_MAX_RATIO = 1.20
OPEN_STREAMS_P50_MAX_EXTRA_MS = 1.0

Rec = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One target of the issue with the figure measured against it."""

    name: str
    measured: str
    verdict: str  # PASS, MISS, INFO or n/a

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "measured": self.measured, "verdict": self.verdict}


def _label(client: str) -> str:
    spec = CLIENTS.get(client)
    return spec.label if spec else client


def _ok(recs: Iterable[Rec]) -> list[Rec]:
    return [r for r in recs if r["result"].get("ok")]


class Results:
    """Indexed records with the two questions every table asks: median, and same-round ratio."""

    def __init__(self, records: Sequence[Rec]) -> None:
        self.records = list(records)

    def select(
        self, workload: str, case: str | None = None, client: str | None = None
    ) -> list[Rec]:
        return [
            r
            for r in self.records
            if r["workload"] == workload
            and (case is None or r["case"] == case)
            and (client is None or r["client"] == client)
        ]

    def cases(self, workload: str) -> list[str]:
        return list(dict.fromkeys(r["case"] for r in self.select(workload)))

    def clients(self, workload: str) -> list[str]:
        return list(dict.fromkeys(r["client"] for r in self.select(workload)))

    def median(self, workload: str, case: str, client: str, metric: str) -> float | None:
        values = [r["result"][metric] for r in _ok(self.select(workload, case, client))]
        return statistics.median(values) if values else None

    def ratio(
        self, workload: str, case: str, client: str, metric: str, base: str = BASELINE
    ) -> float | None:
        """Median over rounds of client/base, each ratio taken within one round."""
        mine = {r["round"]: r["result"][metric] for r in _ok(self.select(workload, case, client))}
        theirs = {r["round"]: r["result"][metric] for r in _ok(self.select(workload, case, base))}
        ratios = [mine[k] / theirs[k] for k in mine if theirs.get(k)]
        return statistics.median(ratios) if ratios else None

    def diff(
        self, workload: str, case: str, client: str, metric: str, base: str = BASELINE
    ) -> float | None:
        """Median over rounds of client - base, each difference taken within one round."""
        mine = {r["round"]: r["result"][metric] for r in _ok(self.select(workload, case, client))}
        theirs = {r["round"]: r["result"][metric] for r in _ok(self.select(workload, case, base))}
        diffs = [mine[k] - theirs[k] for k in mine if k in theirs]
        return statistics.median(diffs) if diffs else None

    def status(self, workload: str, case: str, client: str) -> str:
        """ "" when some run succeeded, else why none did."""
        recs = self.select(workload, case, client)
        if _ok(recs) or not recs:
            return ""
        result = recs[-1]["result"]
        if result.get("status") == "unavailable":
            return f"not available yet: {result.get('reason', '')}"
        return f"error: {result.get('reason', '')}"

    def rounds(self, workload: str, case: str, client: str) -> int:
        return len(_ok(self.select(workload, case, client)))


# --- formatting -----------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


Table = tuple[list[str], list[list[str]]]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A fixed-width (or Markdown) table; the first column left-aligned, the rest right."""
    if markdown:
        head = "| " + " | ".join(headers) + " |"
        rule = "|" + "|".join([" --- "] + [" ---: "] * (len(headers) - 1)) + "|"
        return "\n".join([head, rule, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [str(first).ljust(widths[0])]
        parts += [str(c).rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _unavailable_row(res: Results, workload: str, case: str, client: str, width: int) -> list[str]:
    what = "n/a" if res.status(workload, case, client).startswith("not available") else "error"
    return [_label(client), case, what, *([""] * (width - 3))]


def unavailable(res: Results, workload: str) -> list[str]:
    """One line per client of the workload that never ran, with why."""
    lines = {}
    for client in res.clients(workload):
        reasons = {res.status(workload, case, client) for case in res.cases(workload)} - {""}
        if reasons:
            lines[client] = f"{_label(client)}: " + "; ".join(sorted(reasons))
    return list(lines.values())


def throughput_table(res: Results) -> Table:
    headers = ["client", "case", "req/s", "CPU µs/req", "req/s ×ceil", "CPU ×ceil", "rounds"]
    rows = []
    for case in res.cases("throughput"):
        for client in res.clients("throughput"):
            if res.status("throughput", case, client):
                rows.append(_unavailable_row(res, "throughput", case, client, len(headers)))
                continue
            rows.append(
                [
                    _label(client),
                    case,
                    _f(res.median("throughput", case, client, "rps"), ",.0f"),
                    _f(res.median("throughput", case, client, "cpu_us_per_req"), ".1f"),
                    _x(res.ratio("throughput", case, client, "rps")),
                    _x(res.ratio("throughput", case, client, "cpu_us_per_req")),
                    str(res.rounds("throughput", case, client)),
                ]
            )
    return headers, rows


def fanout_ideal(res: Results, case: str) -> float | None:
    recs = res.select("fanout", case)
    if not recs:
        return None
    p = recs[0]["params"]
    ideal: float = math.ceil(p["n"] / p["concurrency"]) * p["latency"]
    return ideal


def fanout_table(res: Results) -> Table:
    headers = ["client", "case", "wall s", "×ideal", "wall ×ceil", "CPU µs/req", "rounds"]
    rows = []
    for case in res.cases("fanout"):
        ideal = fanout_ideal(res, case) or math.nan
        for client in res.clients("fanout"):
            if res.status("fanout", case, client):
                rows.append(_unavailable_row(res, "fanout", case, client, len(headers)))
                continue
            wall = res.median("fanout", case, client, "wall_s")
            rows.append(
                [
                    _label(client),
                    case,
                    _f(wall, ".2f"),
                    _x(None if wall is None else wall / ideal),
                    _x(res.ratio("fanout", case, client, "wall_s")),
                    _f(res.median("fanout", case, client, "cpu_us_per_req"), ".1f"),
                    str(res.rounds("fanout", case, client)),
                ]
            )
    return headers, rows


def memory_table(res: Results) -> Table:
    headers = ["client", "case", "ΔRSS MB", "baseline MB", "peak MB", "req/s", "rounds"]
    rows = []
    for case in res.cases("memory"):
        for client in res.clients("memory"):
            if res.status("memory", case, client):
                rows.append(_unavailable_row(res, "memory", case, client, len(headers)))
                continue
            rows.append(
                [
                    _label(client),
                    case,
                    _f(res.median("memory", case, client, "rss_delta_mb"), ".1f"),
                    _f(res.median("memory", case, client, "rss_baseline_mb"), ".1f"),
                    _f(res.median("memory", case, client, "rss_peak_mb"), ".1f"),
                    _f(res.median("memory", case, client, "rps"), ",.0f"),
                    str(res.rounds("memory", case, client)),
                ]
            )
    return headers, rows


def memory_inputs(res: Results) -> str:
    """Which input form the memory runs used (older results files have no ``inputs``)."""
    forms = {r["params"].get("inputs", "generator") for r in res.select("memory")}
    said = {
        "list": "the same list of distinct prompts, built (every string touched) before the "
        "memory baseline, so no client is charged for the caller's inputs",
        "generator": "a lazy generator of distinct prompts, consumed inside the measured "
        "phase (LangChain rows turn it into the list they need, and pay for it)",
    }
    return "Inputs: " + "; ".join(f"{said.get(f, f)} ({f})" for f in sorted(forms)) + "."


def stream_table(res: Results) -> Table:
    headers = ["client", "case", "CPU µs/piece", "×ceil", "first piece ms", "×ceil", "p95 ms"]
    rows = []
    for case in res.cases("stream"):
        for client in res.clients("stream"):
            if res.status("stream", case, client):
                rows.append(_unavailable_row(res, "stream", case, client, len(headers)))
                continue
            rows.append(
                [
                    _label(client),
                    case,
                    _f(res.median("stream", case, client, "cpu_us_per_piece"), ".1f"),
                    _x(res.ratio("stream", case, client, "cpu_us_per_piece")),
                    _f(res.median("stream", case, client, "ttfp_ms"), ".1f"),
                    _x(res.ratio("stream", case, client, "ttfp_ms")),
                    _f(res.median("stream", case, client, "ttfp_p95_ms"), ".1f"),
                ]
            )
    return headers, rows


def streams_table(res: Results) -> Table:
    headers = [
        "client",
        "case",
        "CPU µs/piece",
        "×ceil",
        "KB/stream",
        "×ceil",
        "delay p50 ms",
        "p50 −ceil ms",
        "p99 ms",
        "pieces/s",
        "rounds",
    ]
    rows = []
    w = "streams"
    for case in res.cases(w):
        for client in res.clients(w):
            if res.status(w, case, client):
                rows.append(_unavailable_row(res, w, case, client, len(headers)))
                continue
            rows.append(
                [
                    _label(client),
                    case,
                    _f(res.median(w, case, client, "cpu_us_per_piece"), ".1f"),
                    _x(res.ratio(w, case, client, "cpu_us_per_piece")),
                    _f(res.median(w, case, client, "rss_kb_per_stream"), ".1f"),
                    _x(res.ratio(w, case, client, "rss_kb_per_stream")),
                    _f(res.median(w, case, client, "delay_p50_ms"), ".2f"),
                    _f(res.diff(w, case, client, "delay_p50_ms"), "+.2f"),
                    _f(res.median(w, case, client, "delay_p99_ms"), ".1f"),
                    _f(res.median(w, case, client, "pieces_per_s"), ",.0f"),
                    str(res.rounds(w, case, client)),
                ]
            )
    return headers, rows


def import_table(res: Results) -> Table:
    headers = ["import", "ms (in-process)", "×aiohttp", "modules", "langchain/tqdm/server loaded"]
    rows = []
    for case in res.cases("import"):
        for name in res.clients("import"):
            if res.status("import", case, name):
                rows.append(_unavailable_row(res, "import", case, name, len(headers)))
                continue
            recs = _ok(res.select("import", case, name))
            loaded = sorted({m for r in recs for m in r["result"]["forbidden"]})
            shown = ", ".join(loaded[:3]) + (f" (+{len(loaded) - 3})" if len(loaded) > 3 else "")
            rows.append(
                [
                    name,
                    _f(res.median("import", case, name, "ms"), ".1f"),
                    _x(res.ratio("import", case, name, "ms", base="aiohttp")),
                    _f(res.median("import", case, name, "modules"), ".0f"),
                    shown or "none",
                ]
            )
    return headers, rows


def uvloop_table(res: Results) -> Table:
    headers = ["case", "generate_many req/s", "with uvloop", "gain", "CPU ×"]
    rows = []
    for case in res.cases("throughput"):
        gain = res.ratio("throughput", case, "mllm-many-uvloop", "rps", base="mllm-many")
        if gain is None:
            continue
        rows.append(
            [
                case,
                _f(res.median("throughput", case, "mllm-many", "rps"), ",.0f"),
                _f(res.median("throughput", case, "mllm-many-uvloop", "rps"), ",.0f"),
                f"{(gain - 1) * 100:+.0f}%",
                _x(
                    res.ratio(
                        "throughput", case, "mllm-many-uvloop", "cpu_us_per_req", base="mllm-many"
                    )
                ),
            ]
        )
    return headers, rows


# --- targets --------------------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _is_langchain(client: str) -> bool:
    return client.startswith(LANGCHAIN_PREFIXES)


def _throughput_targets(res: Results) -> list[Target]:
    out: list[Target] = []
    for case in res.cases("throughput"):
        if case not in TARGET_CASES:
            continue
        for client in res.clients("throughput"):
            if client in THROUGHPUT_TARGETS:
                min_rps, max_cpu, issue = THROUGHPUT_TARGETS[client]
            elif _is_langchain(client):
                min_rps, max_cpu, issue = LANGCHAIN_MIN_RATIO, None, "17"
            else:
                continue
            rps = res.ratio("throughput", case, client, "rps")
            cpu = res.ratio("throughput", case, client, "cpu_us_per_req")
            ok = None if rps is None else rps >= min_rps
            name = f"throughput {case}: {client} ≥{min_rps:.2f}× raw aiohttp req/s"
            measured = f"{_x(rps)} req/s"
            if max_cpu is not None:
                name += f", ≤{max_cpu:.2f}× its CPU/req"
                ok = None if ok is None or cpu is None else (ok and cpu <= max_cpu)
            measured += f", {_x(cpu)} CPU"
            if client == "mllm-many-uvloop":
                name += " on the default loop"
            out.append(Target(f"{name} (issue {issue})", measured, _verdict(ok)))
    return out


def _fanout_targets(res: Results) -> list[Target]:
    out: list[Target] = []
    for case in res.cases("fanout"):
        ideal = fanout_ideal(res, case)
        for client in res.clients("fanout"):
            if not client.startswith("mllm") or ideal is None:
                continue
            limit = LANGCHAIN_FANOUT_MAX_X_IDEAL if _is_langchain(client) else FANOUT_MAX_X_IDEAL
            wall = res.median("fanout", case, client, "wall_s")
            x = None if wall is None else wall / ideal
            out.append(
                Target(
                    f"fan-out {case}: {client} within {limit}× of ideal {ideal:.2f} s",
                    f"{_f(wall, '.2f')} s = {_x(x)}",
                    _verdict(None if x is None else x <= limit),
                )
            )
        if res.select("fanout", case, "incumbent"):
            for client in res.clients("fanout"):
                if not _is_langchain(client):
                    continue
                speedup = res.ratio("fanout", case, "incumbent", "wall_s", base=client)
                out.append(
                    Target(
                        f"fan-out {case}: {client} ≥{ABATCH_MIN_SPEEDUP:.0f}× faster than the "
                        "incumbent's abatch",
                        _x(speedup),
                        _verdict(None if speedup is None else speedup >= ABATCH_MIN_SPEEDUP),
                    )
                )
    return out


def _memory_targets(res: Results) -> list[Target]:
    out: list[Target] = []
    cases = res.cases("memory")
    if not cases:
        return out
    small, large = cases[0], cases[-1]
    many = res.median("memory", large, "mllm-many", "rss_delta_mb")
    for client in res.clients("memory"):
        if not client.startswith("mllm"):
            continue
        big = res.median("memory", large, client, "rss_delta_mb")
        if _is_langchain(client):
            x = None if big is None or not many else big / many
            out.append(
                Target(
                    f"memory {large}: {client} ≤{LANGCHAIN_MEMORY_MAX_X_MANY}× generate_many's "
                    "ΔRSS (issue 17)",
                    f"{_f(big, '.1f')} MB against {_f(many, '.1f')} MB = {_x(x)}",
                    _verdict(None if x is None else x <= LANGCHAIN_MEMORY_MAX_X_MANY),
                )
            )
            continue
        little = res.median("memory", small, client, "rss_delta_mb")
        out.append(
            Target(
                f"memory {large}: {client} ≤{MEMORY_MAX_MB:.0f} MB above baseline",
                f"{_f(big, '.1f')} MB",
                _verdict(None if big is None else big <= MEMORY_MAX_MB),
            )
        )
        if client == "mllm-many":
            continue  # returns a list of every reply: grows with the input by design
        growth = None if big is None or little is None else big - little
        out.append(
            Target(
                f"memory flat {small}→{large}: {client} grows ≤{MEMORY_FLAT_MB:.0f} MB",
                f"{_f(growth, '+.1f')} MB",
                _verdict(None if growth is None else growth <= MEMORY_FLAT_MB),
            )
        )
    return out


def _stream_targets(res: Results) -> list[Target]:
    out: list[Target] = []
    for case in res.cases("stream"):
        if not res.select("stream", case, "mllm-stream"):
            continue
        for metric, what in (("cpu_us_per_piece", "CPU per piece"), ("ttfp_ms", "first piece")):
            ratio = res.ratio("stream", case, "mllm-stream", metric)
            out.append(
                Target(
                    f"stream {case}: client.stream {what} ≤{STREAM_MAX_RATIO}× raw aiohttp lines",
                    _x(ratio),
                    _verdict(None if ratio is None else ratio <= STREAM_MAX_RATIO),
                )
            )
    cases = res.cases("streams")
    for case in cases:
        if not res.select("streams", case, "mllm-stream"):
            continue
        judged = case == OPEN_STREAMS_CASE or len(cases) == 1

        def verdict(ok: bool | None, judged: bool = judged) -> str:
            return _verdict(ok) if judged else "INFO"

        cpu = res.ratio("streams", case, "mllm-stream", "cpu_us_per_piece")
        mem = res.ratio("streams", case, "mllm-stream", "rss_kb_per_stream")
        p50 = res.diff("streams", case, "mllm-stream", "delay_p50_ms")
        p99 = res.diff("streams", case, "mllm-stream", "delay_p99_ms")
        out += [
            Target(
                f"{case}: client.stream CPU/piece ≤{OPEN_STREAMS_CPU_MAX_RATIO}× raw aiohttp",
                _x(cpu),
                verdict(None if cpu is None else cpu <= OPEN_STREAMS_CPU_MAX_RATIO),
            ),
            Target(
                f"{case}: client.stream memory/stream ≤{OPEN_STREAMS_MEM_MAX_RATIO}× raw aiohttp",
                _x(mem),
                verdict(None if mem is None else mem <= OPEN_STREAMS_MEM_MAX_RATIO),
            ),
            Target(
                f"{case}: client.stream delay p50 ≤ raw aiohttp's "
                f"+{OPEN_STREAMS_P50_MAX_EXTRA_MS:.0f} ms",
                f"{_f(p50, '+.2f')} ms",
                verdict(None if p50 is None else p50 <= OPEN_STREAMS_P50_MAX_EXTRA_MS),
            ),
            Target(f"{case}: client.stream delay p99 against raw aiohttp's",
                   f"{_f(p99, '+.2f')} ms", "INFO"),
        ]  # fmt: skip
    return out


def _import_targets(res: Results) -> list[Target]:
    out: list[Target] = []
    if not res.select("import", client="modal_llm"):
        return out
    case = res.cases("import")[0]
    recs = _ok(res.select("import", case, "modal_llm"))
    forbidden = sorted({m for r in recs for m in r["result"]["forbidden"]})
    out.append(
        Target(
            "import modal_llm loads no langchain, tqdm or modal_llm.server",
            ", ".join(forbidden) or "none loaded",
            _verdict(None if not recs else not forbidden),
        )
    )
    ratio = res.ratio("import", case, "modal_llm", "ms", base="aiohttp")
    out.append(
        Target(
            f"import modal_llm ≤{IMPORT_MAX_RATIO}× import aiohttp (our threshold)",
            _x(ratio),
            _verdict(None if ratio is None else ratio <= IMPORT_MAX_RATIO),
        )
    )
    return out


def targets(res: Results) -> list[Target]:
    """Every target of issues 17 (and 6, where 17 asks for no regression) this run measured."""
    out = _throughput_targets(res)
    out += _fanout_targets(res)
    out += _memory_targets(res)
    out += _stream_targets(res)
    out += _import_targets(res)
    for case in res.cases("throughput"):
        gain = res.ratio("throughput", case, "mllm-many-uvloop", "rps", base="mllm-many")
        if gain is not None:
            out.append(
                Target(
                    f"uvloop gain, generate_many {case}", f"{(gain - 1) * 100:+.0f}% req/s", "INFO"
                )
            )
    return out


# --- whole report ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem_gb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions: dict[str, str | None] = {}
    for dist in (
        "aiohttp",
        "httpx",
        "requests",
        "langchain-core",
        "langchain-community",
        "pydantic",
        "uvloop",
        "orjson",
        "matplotlib",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "modal_llm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": None if mem_gb is None else round(mem_gb, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        "git": commit + (" (modal_llm has uncommitted changes)" if dirty else ""),
    }


def render(data: dict[str, Any], markdown: bool = False) -> str:
    """The whole report: plain text for stdout, or Markdown for docs/benchmarks.md."""
    res = Results(data["records"])
    meta = data["meta"]
    plan = data["plan"]
    m = meta["machine"]
    out: list[str] = []

    def title(text: str, level: int = 4) -> None:
        out.extend(["", "#" * level + " " + text, ""] if markdown else ["", text])

    def para(text: str) -> None:
        out.append(f"{text}\n" if markdown else text)

    def bullets(lines: Iterable[str]) -> None:
        out.extend(f"- {ln}" if markdown else f"  {ln}" for ln in lines)
        if markdown:
            out.append("")

    def tab(found: Table) -> None:
        out.append(table(*found, markdown=markdown))
        if markdown:
            out.append("")  # a line right after a Markdown table would join it

    heading = (
        f"modal-llm benchmarks ({plan['mode']} mode, {plan['rounds']} round(s), "
        f"{meta.get('duration_s', 0):.0f} s, started {meta.get('started', '?')})"
    )
    if markdown:
        title(heading, 3)
    else:
        out.append(heading)
    setup = [
        f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gb']} GB, {m['os']}, "
        f"Python {m['python']}, git {m['git']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"pinning: {meta.get('pinning')}",
        f"command: python -m benchmarks {' '.join(meta.get('argv', []))}".rstrip(),
    ]
    setup += [
        f"merged from a second invocation: python -m benchmarks {' '.join(m['argv'])} "
        f"(started {m['started']}, {m['duration_s']:.0f} s)"
        for m in meta.get("merged", [])
    ]
    setup += [f"server for {w}: {server}" for w, server in meta.get("servers", {}).items()]
    setup += [f"note: {n}" for n in meta.get("notes", [])]
    if plan.get("profile_dir"):
        setup.append(f"profiled into {plan['profile_dir']}: timings include cProfile overhead")
    bullets(setup)
    para("Ratios (×) are medians of per-round ratios against raw aiohttp (the ceiling).")
    sections = [
        ("throughput", "Workload 1: CPU-bound throughput against a fixed reply", throughput_table),
        ("fanout", "Workload 2: latency-bound fan-out", fanout_table),
        ("memory", "Workload 3: peak RSS above the post-import baseline", memory_table),
        ("stream", "Workload 4: concurrent SSE streams", stream_table),
        ("import", "Workload 5: import time (fresh interpreter each)", import_table),
        ("streams", "Workload 6: thousands of open SSE streams", streams_table),
    ]
    for workload, name, make in sections:
        if not res.select(workload):
            continue
        title(name)
        if workload == "streams":
            p = res.select("streams")[0]["params"]
            para(
                f"Each stream: {p['pieces']} pieces {p['piece_delay'] * 1e3:.0f} ms apart, "
                f"streams started over {p['ramp_s']} s. Memory is peak RSS above the "
                "post-import baseline ÷ streams; delay is from the server writing a piece to "
                "the caller holding it (timestamps in the pieces); p50 −ceil is the same-round "
                "difference to raw aiohttp."
            )
        if workload == "memory":
            para(memory_inputs(res))
        if workload == "fanout":
            case = res.cases("fanout")[0]
            p = res.select("fanout", case)[0]["params"]
            para(
                f"{p['n']} prompts, concurrency {p['concurrency']}, {p['latency']} s latency: "
                f"ideal ceil({p['n']}/{p['concurrency']}) × {p['latency']} = "
                f"{fanout_ideal(res, case):.2f} s"
            )
        tab(make(res))
        missing = unavailable(res, workload)
        if missing:
            para("Not measured:")
            bullets(missing)
        if workload == "import" and data.get("import_profile"):
            heavy = ", ".join(
                f"{p['module']} {p['self_ms']:.1f}" for p in data["import_profile"][:8]
            )
            para(f"Heaviest modules `import modal_llm` adds beyond aiohttp (self ms): {heavy}")
    uv = uvloop_table(res)
    if uv[1]:
        title("uvloop: modal-llm generate_many under uvloop against the default loop")
        tab(uv)
    found = targets(res)
    if found:
        title("Targets (issue 17; issue 6 where 17 asks for no regression)")
        if plan["mode"] == "quick":
            para("Quick mode: smoke sizes and one round; the verdicts are indicative only.")
        tab((["target", "measured", "result"], [[t.name, t.measured, t.verdict] for t in found]))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def plot(data: dict[str, Any], path: Path) -> bool:
    """Requests/s against concurrency for every client; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = Results(data["records"])
    cases = res.cases("throughput")
    conc = {case: int(case.removeprefix("c=")) for case in cases}
    fig, ax = plt.subplots(figsize=(11, 5.5))
    drawn = 0
    for client in res.clients("throughput"):
        points = [
            (conc[c], rps)
            for c in cases
            if (rps := res.median("throughput", c, client, "rps")) is not None
        ]
        if not points:
            continue
        family = CLIENTS[client].family if client in CLIENTS else "peer"
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            ys,
            marker="o",
            linestyle="-" if family == "modal-llm" else "--",
            linewidth=2.2 if client == BASELINE else 1.5,
            label=_label(client),
        )
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(conc.values()), [str(c) for c in sorted(conc.values())])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("requests/s (median)")
    plan = data["plan"]
    server = data["meta"].get("servers", {}).get("throughput", "server")
    ax.set_title(
        f"CPU-bound throughput against {server} ({plan['mode']} mode, "
        f"median of {plan['rounds']} round(s))"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_streams(data: dict[str, Any], path: Path) -> bool:
    """CPU per piece, memory per stream and delivery delay against open streams (workload 6)."""
    res = Results(data["records"])
    cases = res.cases("streams")
    if not cases:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = {case: int(case.split()[0]) for case in cases}
    panels = (
        ("cpu_us_per_piece", "client CPU µs per piece"),
        ("rss_kb_per_stream", "peak RSS above baseline, KB per open stream"),
        ("delay_p50_ms", "delivery delay, ms (solid p50, dotted p99)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.8))
    drawn = 0
    for ax, (metric, ylabel) in zip(axes, panels, strict=True):
        for color, client in enumerate(res.clients("streams")):
            for m, style in ((metric, "-"), ("delay_p99_ms", ":")):
                if style == ":" and metric != "delay_p50_ms":
                    continue
                points = [(size[c], v) for c in cases if (v := res.median("streams", c, client, m))]
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                label = _label(client) + (" p99" if style == ":" else "")
                ax.plot(xs, ys, marker="o", linestyle=style, color=f"C{color}", label=label)
                drawn += 1
        ax.set_xscale("log")
        ax.set_xticks(sorted(size.values()), [f"{n:,}" for n in sorted(size.values())])
        ax.minorticks_off()
        ax.set_xlabel("concurrent open SSE streams")
        ax.set_ylabel(ylabel)
        if metric == "delay_p50_ms":
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if not drawn:
        plt.close(fig)
        return False
    p = res.select("streams")[0]["params"]
    fig.suptitle(
        f"Open SSE streams, {p['pieces']} pieces {p['piece_delay'] * 1e3:.0f} ms apart each "
        f"({data['plan']['mode']} mode, median of {data['plan']['rounds']} round(s))"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
