"""``modal-llm batch INPUT -o OUTPUT``: a file of prompts through one client, resumable.

The order of a run: check the paths and the options (nothing is created for a bad command
line), read what OUTPUT already holds, scan INPUT once (duplicate ids are refused before
anything is sent), then fan out through ``AsyncClient.map``-style fan-out, writing each
result as it arrives. Ctrl-C and SIGTERM cancel the requests in flight, keep what was
written and say how to resume; a failure that every item would share stops the run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Final

from .._argtypes import MAX_CONCURRENCY, count, per_second
from .._batch import BatchResult
from .._client import AsyncClient
from .._config import DEFAULT_MAX_CONCURRENCY
from .._exceptions import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ContractError,
    ModalLLMError,
    ReplyTooLargeError,
)
from .._hooks import AttemptEvent, AttemptHook
from .._progress import INSTALL_HINT, Progress
from .batch_input import BatchInput, IdCheck, check_paths, is_parquet, os_problem, scan_lines
from .batch_output import JsonlSink, completed_ids, record
from .common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliExit,
    error_exit,
    make_client,
)
from .interrupts import Interrupts, Terminated, interruption

__all__ = ["CONTRACT_PROBE", "add_parser", "batch"]

CONTRACT_PROBE: Final = 5
"""A run whose first this-many results are all contract errors stops: the endpoint does not
speak the contract (a wrong URL, most likely), and every other item would fail the same way."""


def add_parser(commands: Any, endpoint: argparse.ArgumentParser) -> None:
    """Register ``batch`` on the ``commands`` subparsers."""
    parser = commands.add_parser(
        "batch",
        parents=[endpoint],
        help="run a file of prompts, writing JSONL or Parquet results (resumable)",
        description="Send every prompt of INPUT and write one result per item to OUTPUT "
        "as results arrive. Rerunning skips ids already completed in OUTPUT.",
    )
    parser.add_argument(
        "input",
        metavar="INPUT",
        help='JSONL ({"id": ..., "prompt": ..., extras}), one prompt per line, or .parquet '
        "(a 'prompt' column); - for stdin",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTPUT",
        help="results: JSONL, or Parquet when the name ends in .parquet; - for stdout",
    )
    parser.add_argument(
        "--format",
        choices=("auto", "jsonl", "text", "parquet"),
        default="auto",
        help="INPUT format; auto: Parquet for *.parquet, else JSONL if the first non-blank "
        "line starts with '{', else text",
    )
    parser.add_argument(
        "--concurrency",
        type=count(1, MAX_CONCURRENCY),
        default=DEFAULT_MAX_CONCURRENCY,
        metavar="N",
        help="requests in flight: the client's max_concurrency (default: %(default)s)",
    )
    parser.add_argument("--rate", type=per_second, metavar="PER_SECOND", help="rate limit")
    parser.add_argument(
        "--adaptive", action="store_true", help="lower concurrency on 429/503, raise it back"
    )
    parser.add_argument("--ordered", action="store_true", help="write results in input order")
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the batch on Ray Data through modal_llm.ray (the 'ray' extra): on a local "
        "Ray, or on the cluster at ADDRESS (e.g. auto, ray://head:10001); same OUTPUT, "
        "same exit status (docs/ray.md)",
    )
    parser.add_argument(
        "--ray-actors",
        type=count(1, MAX_CONCURRENCY),
        default=2,
        metavar="N",
        help="with --ray: actors, each with one client; --concurrency is split over them "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr (default: when stderr is a terminal)",
    )


@dataclass
class _Run:
    """Counts of one run, and how it was interrupted."""

    ok: int = 0
    failed: int = 0
    contract: int = 0
    retries: int = 0

    def on_failure(self, event: AttemptEvent) -> None:
        """The client's "failure" hook: count the attempts that will be retried."""
        if event.will_retry:
            self.retries += 1

    def count(self, result: BatchResult) -> ModalLLMError | None:
        """Count ``result``; return an error that should stop the whole run, if any."""
        if result.ok:
            self.ok += 1
            return None
        self.failed += 1
        error = result.error
        assert error is not None
        if isinstance(error, AuthenticationError):
            return error
        if self.ok:
            return None
        if isinstance(error, (ConnectError, ConfigError)):
            return error
        if isinstance(error, ContractError) and not isinstance(error, ReplyTooLargeError):
            self.contract += 1
            if self.contract == self.failed == CONTRACT_PROBE:
                return error
        return None


def batch(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """Run ``batch``; return the exit status (``CliExit``/errors propagate to ``main``).

    Ctrl-C and SIGTERM (``interrupts``, shared by every command) end it with what is in
    OUTPUT and how to resume.
    """
    state = _Run()
    try:
        return _batch(args, state, interrupts)
    except (KeyboardInterrupt, Terminated) as exc:
        raise _interrupted(args, state, exc) from None


def _batch(args: argparse.Namespace, state: _Run, interrupts: Interrupts) -> int:
    in_parquet = args.format == "parquet" or (args.format == "auto" and is_parquet(args.input))
    out_parquet = is_parquet(args.output)
    if in_parquet and args.input == "-":
        raise CliExit(EXIT_USAGE, "Parquet INPUT cannot come from stdin: give its file name")
    check_paths(args.input, args.output)
    # A bad URL or half a credential fails here, before any file is created.
    hooks: dict[str, list[AttemptHook]] = {"failure": [state.on_failure]}
    client = make_client(args, max_concurrency=args.concurrency, event_hooks=hooks)

    done: set[str] = set()
    sink: Any
    if out_parquet:
        from .parquet import ParquetSink

        sink = ParquetSink(args.output)
        sink.completed(done)
    else:
        sink = JsonlSink(args.output)
        if args.output != "-":
            completed_ids(args.output, done)
    name = "<stdin>" if args.input == "-" else args.input
    kind = sink.kind if out_parquet else None
    check = IdCheck(name, "row" if in_parquet else "line", one_kind=out_parquet, kind=kind)

    with contextlib.ExitStack() as stack:
        fmt, total, stream, rows = args.format, None, None, None
        if in_parquet:
            from .parquet import parquet_rows, scan_parquet

            total = scan_parquet(args.input, check)
            rows = parquet_rows(args.input)
        else:
            stream = _open_input(args.input)
            if args.input != "-":
                stack.callback(stream.close)
            if args.input != "-" and os.path.isfile(args.input):
                try:
                    fmt, total = scan_lines(stream, fmt, check)
                except OSError as exc:
                    raise CliExit(
                        EXIT_USAGE, f"cannot read INPUT {args.input}: {os_problem(exc)}"
                    ) from None
        scanned = total is not None
        check.refuse_duplicates(sent=False)

        show = sys.stderr.isatty() if args.progress is None else args.progress
        progress = Progress(total, enabled=show)
        stack.callback(progress.close)
        if progress.fallback and args.progress:
            print(f"({INSTALL_HINT} for a progress bar)", file=sys.stderr)
        source = BatchInput(
            name,
            fmt,
            done,
            progress,
            check,
            stream=stream,
            scanned=scanned,
            params=dict(args.param),
        )
        if rows is not None:
            source.parquet(rows)

        sink.open()
        if out_parquet:
            stack.callback(lambda: sink.close(check.kind))
        else:
            stack.callback(sink.close)
        try:
            if args.ray is not None:
                from .ray_batch import run_on_ray

                run_on_ray(args, client, source, sink, progress, state, run=interrupts.run)
            else:
                interrupts.run(_run_batch(args, client, source, sink, progress, state))
            if stream is not None and args.input == "-" and stream is not sys.stdin.buffer:
                stream.close()  # read to its end: no reader thread holds it any more
        except CliExit as exc:
            if sink.written and args.output != "-":
                exc.message += (
                    f" (batch stopped; {state.ok} succeeded and {state.failed} failed are in "
                    f"{args.output}: rerun the same command to resume)"
                )
            raise

    retries = f"{state.retries} retr{'y' if state.retries == 1 else 'ies'}"
    parts = [f"{state.ok} succeeded", f"{state.failed} failed", retries]
    if source.bad:
        parts.append(f"{source.bad} bad input {check.unit}s skipped")
    if source.skipped:
        parts.append(f"{source.skipped} already done in {args.output}")
    print(f"{PROG} batch: " + ", ".join(parts), file=sys.stderr)
    if state.failed:
        return EXIT_FAILED
    return EXIT_BAD_INPUT if source.bad else EXIT_OK


def _open_input(path: str) -> Any:
    if path == "-":
        # A reader of our own over a copy of fd 0: the thread that reads a pipe may still be
        # blocked in it after Ctrl-C or SIGTERM, holding its lock, and the interpreter's
        # shutdown aborts ("could not acquire lock for <stdin>") if that is sys.stdin's.
        # It is closed only once read to its end (closing waits for that lock).
        try:
            return os.fdopen(os.dup(sys.stdin.fileno()), "rb")
        except (OSError, ValueError):  # io.UnsupportedOperation: a stdin without a file
            return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CliExit(EXIT_USAGE, f"cannot read INPUT {path}: {os_problem(exc)}") from None


async def _run_batch(
    args: argparse.Namespace,
    client: AsyncClient,
    source: BatchInput,
    sink: Any,
    progress: Progress,
    state: _Run,
) -> None:
    async with client:
        # One concurrency number: the client's cap, which map() uses by default.
        # --param goes into each item (not map's **extra), so that a model argument
        # named like one of map's options stays a model argument.
        results = client.map(
            source.items(),
            ordered=args.ordered,
            rate_limit=args.rate,
            adaptive=args.adaptive,
            stop=args.stop,
        )
        async with contextlib.aclosing(results):
            async for result in results:
                sink.write(record(result))
                progress.advance(failed=not result.ok)
                stop = state.count(result)
                if stop is not None:
                    raise _stop(stop, state)


def _stop(error: ModalLLMError, state: _Run) -> CliExit:
    return error_exit(error, replies=max(state.contract, 1))


def _interrupted(args: argparse.Namespace, state: _Run, exc: BaseException) -> CliExit:
    how, code = interruption(exc)
    counts = f"{state.ok} succeeded and {state.failed} failed"
    if args.output == "-":
        where = f"{counts} went to stdout (nothing to resume from)"
    else:
        where = f"{counts} are in {args.output}; rerun the same command to resume"
    return CliExit(code, f"interrupted by {how}: {where}", error=False)
