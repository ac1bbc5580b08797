"""``modal-llm batch INPUT -o OUTPUT``: a file of prompts through one client, resumable.

The order of a run: check the paths and the options (nothing is created for a bad command
line), read what OUTPUT already holds, scan INPUT once (duplicate ids are refused before
anything is sent), then fan out through ``AsyncClient.map``-style fan-out, writing each
result as it arrives. Ctrl-C and SIGTERM cancel the requests in flight, keep what was
written and say how to resume; a failure that every item would share stops the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

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
from .._fanout import BatchResult
from .._hooks import AttemptEvent, AttemptHook
from .._progress import INSTALL_HINT, Progress
from .._run import run
from .batch_input import BatchInput, IdCheck, check_paths, is_parquet, os_problem, scan_lines
from .batch_output import JsonlSink, completed_ids, record
from .common import (
    EXIT_BAD_INPUT,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    PROG,
    CliExit,
    error_exit,
    make_client,
    one_line,
    positive_float,
    positive_int,
)

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
        type=positive_int,
        default=DEFAULT_MAX_CONCURRENCY,
        metavar="N",
        help="requests in flight: the client's max_concurrency (default: %(default)s)",
    )
    parser.add_argument("--rate", type=positive_float, metavar="PER_SECOND", help="rate limit")
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
        type=positive_int,
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


class _Terminated(BaseException):
    """SIGTERM outside the event loop (it cancels the run when inside)."""


@dataclass
class _Run:
    """Counts of one run, and how it was interrupted."""

    ok: int = 0
    failed: int = 0
    contract: int = 0
    retries: int = 0
    signal: str | None = None
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task[Any] | None = None

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signal = "SIGTERM"
        if self.loop is not None and self.task is not None and not self.task.done():
            # As asyncio.run does for Ctrl-C: cancel the run, so it unwinds cleanly.
            self.loop.call_soon_threadsafe(self.task.cancel)
        else:
            raise _Terminated

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


def batch(args: argparse.Namespace) -> int:
    """Run ``batch``; return the exit status (``CliExit``/errors propagate to ``main``)."""
    state = _Run()
    try:
        previous = signal.signal(signal.SIGTERM, state.on_sigterm)
    except ValueError:  # not the main thread (tests run main() in a thread)
        previous = None
    try:
        return _batch(args, state)
    except (KeyboardInterrupt, _Terminated):
        raise _interrupted(args, state) from None
    except asyncio.CancelledError:
        if state.signal is None:
            raise
        raise _interrupted(args, state) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _batch(args: argparse.Namespace, state: _Run) -> int:
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
            if stream is not sys.stdin.buffer:
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

                run_on_ray(args, client, source, sink, progress, state)
            else:
                run(_run_batch(args, client, source, sink, progress, state))
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
    state.loop, state.task = asyncio.get_running_loop(), asyncio.current_task()
    try:
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
    finally:
        state.loop = state.task = None


def _stop(error: ModalLLMError, state: _Run) -> CliExit:
    if isinstance(error, ContractError):
        return CliExit(
            EXIT_CONFIG,
            f"the endpoint does not speak the contract: its first {state.contract} replies "
            'were not a JSON object with the text under "prompt" (the last: '
            f"{one_line(error)}); check --endpoint or $MODAL_LLM_ENDPOINT_URL",
        )
    return error_exit(error)


def _interrupted(args: argparse.Namespace, state: _Run) -> CliExit:
    how, code = ("SIGTERM", EXIT_TERMINATED) if state.signal else ("Ctrl-C", EXIT_INTERRUPTED)
    counts = f"{state.ok} succeeded and {state.failed} failed"
    if args.output == "-":
        where = f"{counts} went to stdout (nothing to resume from)"
    else:
        where = f"{counts} are in {args.output}; rerun the same command to resume"
    return CliExit(code, f"interrupted by {how}: {where}", error=False)
