"""``modal-llm batch INPUT -o OUTPUT``: a file of prompts through one client, resumable."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import AsyncIterator, Callable
from typing import IO, Any, NoReturn

from .._config import DEFAULT_MAX_CONCURRENCY
from .._exceptions import AuthenticationError, ConfigError, ConnectError, ModalLLMError
from .._progress import INSTALL_HINT, Progress
from .._run import run
from .batch_io import (
    BatchInput,
    completed_ids,
    count_items,
    file_chunks,
    open_input,
    record,
    stdin_chunks,
)
from .common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliExit,
    error_exit,
    make_client,
    positive_float,
    positive_int,
)

__all__ = ["add_parser", "batch"]


def add_parser(commands: Any, endpoint: argparse.ArgumentParser) -> None:
    """Register ``batch`` on the ``commands`` subparsers."""
    parser = commands.add_parser(
        "batch",
        parents=[endpoint],
        help="run a file of prompts, writing JSONL results (resumable)",
        description="Send every prompt of INPUT and append one JSON line per result to "
        "OUTPUT as results arrive. Rerunning skips ids already completed in OUTPUT.",
    )
    parser.add_argument(
        "input",
        metavar="INPUT",
        help='JSONL ({"id": ..., "prompt": ..., extras}) or one prompt per line; - for stdin',
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="JSONL results")
    parser.add_argument(
        "--format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="INPUT format; auto: JSONL if the first non-blank line starts with '{'",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_MAX_CONCURRENCY,
        help="requests in flight (default: %(default)s)",
    )
    parser.add_argument("--rate", type=positive_float, metavar="PER_SECOND", help="rate limit")
    parser.add_argument(
        "--adaptive", action="store_true", help="lower concurrency on 429/503, raise it back"
    )
    parser.add_argument("--ordered", action="store_true", help="write results in input order")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr (default: when stderr is a terminal)",
    )


def batch(args: argparse.Namespace) -> int:
    """Run ``batch``; return the exit status (``CliExit``/errors propagate to ``main``)."""
    to_stdout = args.output == "-"
    done, needs_newline = (set(), False) if to_stdout else completed_ids(args.output)
    stream, piped = open_input(args.input)
    with contextlib.ExitStack() as stack:
        if stream is not sys.stdin.buffer:
            stack.enter_context(stream)
        show = sys.stderr.isatty() if args.progress is None else args.progress
        total = count_items(stream) if show and not piped else None
        progress = Progress(total, enabled=show)
        stack.callback(progress.close)
        if progress.fallback and args.progress:
            print(f"({INSTALL_HINT} for a progress bar)", file=sys.stderr)
        if to_stdout:
            out: IO[str] = sys.stdout
        else:
            try:
                out = stack.enter_context(open(args.output, "a", encoding="utf-8"))
            except OSError as exc:
                raise CliExit(
                    EXIT_USAGE, f"cannot write {args.output}: {exc.strerror or exc}"
                ) from None
            if needs_newline:
                out.write("\n")
        name = "<stdin>" if args.input == "-" else args.input
        source = BatchInput(name, args.format, done, progress)
        chunks = functools.partial(stdin_chunks if piped else file_chunks, stream)
        ok, failed = run(_run_batch(args, source, chunks, out, progress))
    parts = [f"{ok} succeeded", f"{failed} failed"]
    if source.bad:
        parts.append(f"{source.bad} bad input lines skipped")
    if source.skipped:
        parts.append(f"{source.skipped} already done in {args.output}")
    print(f"{PROG} batch: " + ", ".join(parts), file=sys.stderr)
    if failed:
        return EXIT_FAILED
    return EXIT_BAD_INPUT if source.bad else EXIT_OK


async def _run_batch(
    args: argparse.Namespace,
    source: BatchInput,
    chunks: Callable[[], AsyncIterator[list[bytes]]],
    out: IO[str],
    progress: Progress,
) -> tuple[int, int]:
    ok = failed = 0
    async with make_client(args, max_concurrency=args.concurrency) as client:
        results = client.map(
            source.items(chunks()),
            ordered=args.ordered,
            concurrency=args.concurrency,
            rate_limit=args.rate,
            adaptive=args.adaptive,
            stop=args.stop,
            **dict(args.param),
        )
        async with contextlib.aclosing(results):
            async for result in results:
                out.write(json.dumps(record(result), ensure_ascii=False) + "\n")
                out.flush()
                progress.advance(failed=not result.ok)
                if result.ok:
                    ok += 1
                    continue
                failed += 1
                error = result.error
                # Every other item would fail the same way: stop instead of hammering.
                if isinstance(error, AuthenticationError) or (
                    isinstance(error, (ConnectError, ConfigError)) and ok == 0
                ):
                    assert error is not None
                    _abort(error)
    return ok, failed


def _abort(error: ModalLLMError) -> NoReturn:
    failure = error_exit(error)
    raise CliExit(failure.code, f"{failure.message} (stopped the batch; rerun to resume)")
