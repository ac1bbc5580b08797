"""Ray Data workload: one input through ``modal_llm.ray.generate``, Ray's own HTTP processor
and the single-process ``modal-llm batch``, clean and with 5 % faults.

Usage (from the repo root; needs the ``ray`` extra)::

    python -m benchmarks.ray_bench                  # 20,000 rows (a few minutes)
    python -m benchmarks.ray_bench --rows 2000 --ray-processor-rows 200   # a smoke run (*)
    python -m benchmarks.ray_bench --json ray.json

The reference endpoint (``python -m modal_llm.server``) runs in a subprocess and answers
every POST after ``--latency`` seconds (50 ms); the faulty one also answers a random 5 % of
POSTs with a plain-text ``500 modal-http: internal error`` (``--failure-rate``, seeded).
Ray runs locally (``ray.init(num_cpus=2)``), started once before the timed runs, so a
run's wall time includes starting its actors but not Ray itself.

- ``modal_llm.ray``: ``generate(ds, url)`` with its defaults (2 actors × 16 calls per
  actor, 64-row batches, 32 requests in flight per actor: 64 in all), written to Parquet.
- ``ray.data.llm``: ``HttpRequestProcessorConfig`` + ``build_processor`` with the same
  2 actors and 64-row batches and ``max_retries=3``. It sends a batch's requests and
  awaits them one after another, so it gets ``--ray-processor-rows`` rows (default 2,000):
  the whole input would take minutes. Its rows/s is what is compared.
- ``modal-llm batch``: the CLI on a JSONL file of the same rows, ``--concurrency 64``.

Per run: wall time, rows/s, rows back (a lost row is an id missing from the output),
failed rows, and whether the run aborted. Targets (issue #13): modal_llm.ray ≥ 20× Ray's
processor rows/s clean; no aborted run and no lost row with faults; modal_llm.ray's wall
time within 2.5× the single process's. Exit status 0 when the targets hold.
The machine's load moves these figures; compare runs from one sitting.
(*) The targets are for the 20,000-row run: the actors' start (3-5 s here) is a fixed cost,
so a 2,000-row smoke run checks that everything works but misses the speed targets
(measured: 15.6x Ray's processor and 3.7x the single process's wall time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LATENCY = 0.05
FAULT_RATE = 0.05
ACTORS = 2
BATCH = 64
IN_FLIGHT = 64  # the single process's concurrency: modal_llm.ray's 2 actors x 32


@dataclass
class Run:
    system: str
    faults: bool
    rows: int
    wall_s: float
    rows_back: int
    lost: int
    failed: int
    aborted: str | None

    @property
    def rows_per_s(self) -> float:
        return self.rows_back / self.wall_s if self.wall_s > 0 and not self.aborted else 0.0


@contextlib.contextmanager
def endpoint(faults: bool, seed: int = 13) -> Iterator[str]:
    from modal_llm.testing import endpoint_process

    flags = ["--latency", str(LATENCY)]
    if faults:
        flags += ["--failure-rate", str(FAULT_RATE), "--seed", str(seed)]
    with endpoint_process(*flags) as url:
        yield url


def rows_of(count: int) -> list[dict[str, Any]]:
    return [{"id": i, "prompt": f"Summarise item {i} in one line"} for i in range(count)]


def run_modal_llm_ray(url: str, count: int, faults: bool, out: Path) -> Run:
    import pyarrow.parquet as pq
    import ray.data

    import modal_llm.ray

    ds = ray.data.from_items(rows_of(count))
    started = time.perf_counter()
    aborted = None
    try:
        modal_llm.ray.generate(ds, url).write_parquet(str(out))
    except Exception as exc:
        aborted = f"{type(exc).__name__} after {time.perf_counter() - started:.1f} s"
    wall = time.perf_counter() - started
    ids: list[int] = []
    failed = 0
    if aborted is None:
        table = pq.read_table(out, columns=["id", "error"])
        ids = table.column("id").to_pylist()
        failed = table.num_rows - table.column("error").null_count
    lost = count - len(set(ids))
    return Run("modal_llm.ray", faults, count, wall, len(ids), lost, failed, aborted)


def run_ray_processor(url: str, count: int, faults: bool) -> Run:
    import ray.data
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(
        url=url, batch_size=BATCH, concurrency=ACTORS, max_retries=3, base_retry_wait_time_in_s=0.5
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {"payload": {"prompt": row["prompt"]}, "id": row["id"]},
        postprocess=lambda row: {"id": row["id"], "text": str(row.get("http_response"))},
    )
    ds = ray.data.from_items(rows_of(count))
    started = time.perf_counter()
    aborted = None
    ids: list[int] = []
    try:
        ids = [row["id"] for row in processor(ds).iter_rows()]
    except Exception as exc:
        aborted = f"{type(exc).__name__} after {time.perf_counter() - started:.1f} s"
        ids = []
    wall = time.perf_counter() - started
    lost = count - len(set(ids))
    return Run("ray.data.llm", faults, count, wall, len(ids), lost, 0, aborted)


def run_cli(url: str, count: int, faults: bool, work: Path) -> Run:
    source, out = work / "in.jsonl", work / "out.jsonl"
    with source.open("w") as handle:
        for row in rows_of(count):
            handle.write(json.dumps(row) + "\n")
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "modal_llm", "batch", str(source), "-o", str(out)]
    command += ["--concurrency", str(IN_FLIGHT), "--endpoint", url]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    ids = [record["id"] for record in records]
    failed = sum(1 for record in records if "error" in record)
    aborted = None if done.returncode in (0, 1) else f"exit {done.returncode}"
    lost = count - len(set(ids))
    return Run("modal-llm batch", faults, count, wall, len(ids), lost, failed, aborted)


def table(runs: list[Run]) -> str:
    lines = [
        "| system | faults | rows | wall s | rows/s | rows back | lost | failed | aborted |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r.system} | {'5 %' if r.faults else 'none'} | {r.rows:,} | {r.wall_s:.1f} | "
            f"{r.rows_per_s:,.0f} | {r.rows_back:,} | {r.lost} | {r.failed} | "
            f"{r.aborted or 'no'} |"
        )
    return "\n".join(lines)


def check(runs: list[Run]) -> list[str]:
    """The issue's targets, each as a line 'PASS|FAIL: ...'."""

    def find(system: str, faults: bool) -> Run | None:
        return next((r for r in runs if r.system == system and r.faults == faults), None)

    out = []
    ours, theirs = find("modal_llm.ray", False), find("ray.data.llm", False)
    if ours and theirs and theirs.rows_per_s > 0:
        ratio = ours.rows_per_s / theirs.rows_per_s
        verdict = "PASS" if ratio >= 20 else "FAIL"
        out.append(f"{verdict}: clean rows/s {ratio:.1f}x Ray's processor")
    faulty = find("modal_llm.ray", True)
    if faulty:
        ok = faulty.aborted is None and faulty.lost == 0
        out.append(
            f"{'PASS' if ok else 'FAIL'}: with faults, aborted={faulty.aborted or 'no'}, "
            f"lost={faulty.lost}, failed={faulty.failed}"
        )
    single = find("modal-llm batch", False)
    if ours and single:
        ratio = ours.wall_s / single.wall_s
        out.append(f"{'PASS' if ratio <= 2.5 else 'FAIL'}: wall {ratio:.2f}x the single process")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000, help="rows per run (20,000)")
    parser.add_argument(
        "--ray-processor-rows", type=int, default=2_000, help="rows for Ray's processor (2,000)"
    )
    parser.add_argument("--skip-ray-processor", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the runs as JSON")
    args = parser.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for faults in (False, True):
            with endpoint(faults) as url:
                runs.append(run_cli(url, args.rows, faults, work))
                print(table(runs[-1:]).splitlines()[-1], flush=True)
                out = work / f"ray-{int(faults)}"
                runs.append(run_modal_llm_ray(url, args.rows, faults, out))
                print(table(runs[-1:]).splitlines()[-1], flush=True)
                if not args.skip_ray_processor:
                    runs.append(run_ray_processor(url, args.ray_processor_rows, faults))
                    print(table(runs[-1:]).splitlines()[-1], flush=True)
    ray.shutdown()
    print()
    print(table(runs))
    verdicts = check(runs)
    print("\n".join(verdicts))
    if args.json:
        data = [{**asdict(r), "rows_per_s": r.rows_per_s} for r in runs]
        Path(args.json).write_text(json.dumps({"runs": data, "checks": verdicts}, indent=2))
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
