"""Run the benchmarks: ``python -m benchmarks [--quick] [--only ...] [--plot]`` from the repo root.

Prints progress to stderr, the report to stdout, and writes the raw results as JSON.
Exits 1 when a run failed outright (a harness or client bug), never over a missed target:
the figures are for people to read, not for CI to assert on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._clients import CLIENTS
from benchmarks._report import machine_info, plot, plot_streams, render
from benchmarks._run import DEFAULT_CLIENTS, WORKLOAD_ALIASES, WORKLOADS, Plan, Runner, plan_dict
from benchmarks._servers import ROOT

DEFAULT_OUT = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
DEFAULT_PLOT = ROOT / "docs" / "benchmarks_rps.png"
STREAMS_PLOT_NAME = "benchmarks_streams.png"


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark modal-llm against raw aiohttp, httpx, requests and "
        "langchain_community's Modal on servers started on 127.0.0.1.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, one round: the CI smoke (< 2 min)"
    )
    parser.add_argument("--only", type=_csv, metavar="CLIENTS", help="comma-separated clients")
    parser.add_argument(
        "--workloads",
        type=_csv,
        metavar="W",
        help=f"comma-separated, from {', '.join(WORKLOADS)} (or 1-6); default all",
    )
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3, quick 1)")
    parser.add_argument(
        "--concurrency", type=_csv, metavar="C", help="throughput concurrencies (1,64,256)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON")
    parser.add_argument(
        "--plot",
        nargs="?",
        type=Path,
        const=DEFAULT_PLOT,
        metavar="PNG",
        help=f"write the req/s plot (default {DEFAULT_PLOT.relative_to(ROOT)}) and, next to "
        f"it, the open-streams plot ({STREAMS_PLOT_NAME})",
    )
    parser.add_argument("--report", type=Path, metavar="JSON", help="re-render a results file")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="MD",
        help=f"also write the report as Markdown: between {BEGIN} and {END} if the file "
        "has them (docs/benchmarks.md does), else as the whole file",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="cProfile each measured phase into DIR/*.prof (timings are then inflated)",
    )
    parser.add_argument("--no-nginx", action="store_true", help="use the Python endpoint")
    parser.add_argument(
        "--latency-server", choices=("auto", "reference", "own"), default="auto",
        help="auto: modal_llm.server if usable, else benchmarks/_latency_server.py",
    )  # fmt: skip
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and clients")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 also when a client is not available"
    )
    parser.add_argument("--list", action="store_true", help="list clients and workloads")
    return parser.parse_args(argv)


def _plan(args: argparse.Namespace) -> Plan:
    overrides: dict[str, Any] = {
        "pin": not args.no_pin,
        "use_nginx": not args.no_nginx,
        "latency_server": args.latency_server,
    }
    if args.rounds is not None:
        overrides["rounds"] = max(1, args.rounds)
    if args.workloads:
        names = [WORKLOAD_ALIASES.get(w, w) for w in args.workloads]
        unknown = [w for w in names if w not in WORKLOADS]
        if unknown:
            raise SystemExit(f"unknown workload(s) {unknown}; choose from {WORKLOADS}")
        overrides["workloads"] = tuple(w for w in WORKLOADS if w in names)
    if args.only:
        unknown = [c for c in args.only if c not in CLIENTS]
        if unknown:
            raise SystemExit(f"unknown client(s) {unknown}; see --list")
        overrides["only"] = tuple(args.only)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        overrides["profile_dir"] = str(args.profile.resolve())
    if args.concurrency:
        overrides["concurrencies"] = tuple(int(c) for c in args.concurrency)
    return Plan.quick(**overrides) if args.quick else Plan.full(**overrides)


def _list() -> None:
    print("clients:")
    for name, spec in CLIENTS.items():
        runs = [w for w, names in DEFAULT_CLIENTS.items() if name in names]
        print(f"  {name:18} {spec.label:36} default in: {', '.join(runs) or '-'}")
    print("workloads: " + ", ".join(f"{i} {w}" for i, w in enumerate(WORKLOADS, start=1)))


def write_markdown(path: Path, report: str) -> None:
    """Put the report between the markers of an existing document, or write it whole."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(BEGIN), text.find(END)
    inside = 0 <= start < end
    text = f"{text[: start + len(BEGIN)]}\n\n{report}\n{text[end:]}" if inside else report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _failures(data: dict[str, Any], strict: bool) -> list[str]:
    bad = []
    for rec in data["records"]:
        result = rec["result"]
        if result.get("ok"):
            continue
        if result.get("status") == "unavailable" and not strict:
            continue
        bad.append(f"{rec['workload']} {rec['case']} {rec['client']}: {result.get('reason')}")
    return bad


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        _list()
        return 0
    if args.report:
        data = json.loads(args.report.read_text())
    else:
        plan = _plan(args)
        started = time.monotonic()
        started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # the report's "started": now
        runner = Runner(plan, _log)
        records = runner.run()
        data = {
            "meta": {
                "started": started_at,
                "duration_s": time.monotonic() - started,
                "argv": sys.argv[1:] if argv is None else argv,
                "machine": machine_info(),
                "servers": runner.servers_used,
                "notes": sorted(
                    set(runner.notes) | {n for r in records for n in r.result.get("notes", [])}
                ),
                "pinning": (
                    f"servers on CPU {sorted(runner.server_cpus or ())}, "
                    f"clients on CPU {sorted(runner.worker_cpus)}"
                    if runner.worker_cpus
                    else "none"
                ),
            },
            "plan": plan_dict(plan),
            "records": [dataclasses.asdict(r) for r in records],
            "import_profile": runner.import_profile,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"bench-{plan.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(data, indent=1))
        _log(f"raw results: {path}")
    print(render(data), end="")
    if args.markdown:
        write_markdown(args.markdown, render(data, markdown=True))
        print(f"\nmarkdown: {args.markdown}")
    if args.plot:
        if plot(data, args.plot):
            print(f"\nplot: {args.plot}")
        else:
            print("\nplot: no throughput figures to draw")
        streams_png = args.plot.with_name(STREAMS_PLOT_NAME)
        if plot_streams(data, streams_png):
            print(f"plot: {streams_png}")
    failures = _failures(data, args.strict)
    if failures:
        print("\nfailed runs:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
