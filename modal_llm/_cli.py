"""The ``modal-llm`` command: ``demo``, ``generate``, ``batch`` and ``serve``.

Expected failures end with one line on stderr and a distinct exit status (see
``EXIT_*`` below and docs/cli.md), never a traceback. tqdm and uvloop are used when
installed and imported only when needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import json
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import IO, Any, Final, NoReturn, TypeVar

from ._client import AsyncClient
from ._config import DEFAULT_MAX_CONCURRENCY, ENV_ENDPOINT_URL, RetryPolicy, Timeout
from ._exceptions import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    EndpointTimeoutError,
    ModalLLMError,
    StatusError,
    TransportError,
)
from ._fanout import BatchItem, BatchResult, fan_out
from ._run import run

__all__ = ["EXIT_CODES", "build_parser", "main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""generate: the request failed; batch: at least one item failed (see OUTPUT)."""
EXIT_USAGE: Final = 2
"""Bad arguments, or INPUT/OUTPUT cannot be opened (argparse uses 2 as well)."""
EXIT_CONFIG: Final = 3
"""Bad or missing endpoint URL, key without secret, or another invalid option."""
EXIT_UNREACHABLE: Final = 4
"""The endpoint could not be reached (refused, DNS, TLS, timeout)."""
EXIT_AUTH: Final = 5
"""The endpoint refused the credentials (401/403)."""
EXIT_BAD_INPUT: Final = 6
"""batch: some input lines were invalid (and skipped); every valid item succeeded."""
EXIT_INTERRUPTED: Final = 130
"""Ctrl-C. batch: what finished is in OUTPUT; rerun the same command to resume."""

EXIT_CODES: Final = {
    EXIT_OK: "success",
    EXIT_FAILED: "the request failed / some batch items failed",
    EXIT_USAGE: "usage error, or INPUT/OUTPUT cannot be opened",
    EXIT_CONFIG: "bad or missing endpoint URL or option",
    EXIT_UNREACHABLE: "endpoint unreachable",
    EXIT_AUTH: "authentication failed",
    EXIT_BAD_INPUT: "batch: bad input lines (skipped)",
    EXIT_INTERRUPTED: "interrupted",
}

PROG: Final = "modal-llm"
_READ_CHUNK: Final = 64 * 1024
T = TypeVar("T")

_AUTH_HINT: Final = "set MODAL_LLM_KEY and MODAL_LLM_SECRET, or pass --modal-key/--modal-secret"


class _Exit(Exception):
    """End the command with ``code`` after printing ``message`` (one line) to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _error_exit(exc: ModalLLMError) -> _Exit:
    """Map an error that ends a command to its exit status and message."""
    text = _one_line(exc)
    if isinstance(exc, ConfigError):
        return _Exit(EXIT_CONFIG, text)
    if isinstance(exc, AuthenticationError):
        return _Exit(EXIT_AUTH, f"authentication failed: {text}; {_AUTH_HINT}")
    if isinstance(exc, EndpointTimeoutError):
        return _Exit(EXIT_UNREACHABLE, f"the endpoint did not answer in time: {text}")
    if isinstance(exc, TransportError):
        return _Exit(EXIT_UNREACHABLE, f"cannot reach the endpoint: {text}")
    return _Exit(EXIT_FAILED, text)


# -- arguments -------------------------------------------------------------------------------


def _param(text: str) -> tuple[str, Any]:
    """``key=value``; the value is JSON when it parses as JSON, else the string itself."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, not {text!r}")
    if key == "prompt":
        raise argparse.ArgumentTypeError("'prompt' is not a model argument; pass the prompt itself")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _client_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("endpoint")
    add = group.add_argument
    add("--endpoint", metavar="URL", help=f"endpoint URL (default: ${ENV_ENDPOINT_URL})")
    add("--modal-key", metavar="KEY", help="proxy auth key (default: $MODAL_LLM_KEY)")
    add("--modal-secret", metavar="SECRET", help="proxy auth secret (default: $MODAL_LLM_SECRET)")
    add(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="connect, first-byte and read timeout (default: the client's, which waits for "
        "cold starts)",
    )
    add("--max-retries", type=_non_negative_int, metavar="N", help="retries per request")
    add(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model argument sent with every prompt; VALUE is JSON if it parses (repeatable)",
    )
    add("--stop", action="append", metavar="TEXT", help="stop sequence (repeatable)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The ``modal-llm`` argument parser (``serve`` is handed to ``modal_llm.server``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Client, batch runner and local reference endpoint for LLM web "
        "endpoints on Modal.",
        epilog="exit status: "
        + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    endpoint = _client_options()

    demo = commands.add_parser(
        "demo",
        help="run a local reference endpoint, stream an answer and fan out a batch",
        description="Start the reference endpoint in-process (a toy generator, no account, "
        "no network), stream one answer, fan out a batch and print a summary.",
    )
    demo.add_argument("--prompts", type=_positive_int, default=300, help="batch size (300)")
    demo.add_argument("--concurrency", type=_positive_int, default=16, help="in flight (16)")
    demo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show progress (a tqdm bar if installed, else a counter)",
    )

    gen = commands.add_parser(
        "generate",
        parents=[endpoint],
        help="send one prompt and print the answer",
        description="Send PROMPT to the endpoint and print the generated text.",
    )
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--stream", action="store_true", help="print the answer as it arrives")

    batch = commands.add_parser(
        "batch",
        parents=[endpoint],
        help="run a file of prompts, writing JSONL results (resumable)",
        description="Send every prompt of INPUT and append one JSON line per result to "
        "OUTPUT as results arrive. Rerunning skips ids already completed in OUTPUT.",
    )
    batch.add_argument(
        "input",
        metavar="INPUT",
        help='JSONL ({"id": ..., "prompt": ..., extras}) or one prompt per line; - for stdin',
    )
    batch.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="JSONL results")
    batch.add_argument(
        "--format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="INPUT format; auto: JSONL if the first non-blank line starts with '{'",
    )
    batch.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_MAX_CONCURRENCY,
        help="requests in flight (default: %(default)s)",
    )
    batch.add_argument("--rate", type=_positive_float, metavar="PER_SECOND", help="rate limit")
    batch.add_argument(
        "--adaptive", action="store_true", help="lower concurrency on 429/503, raise it back"
    )
    batch.add_argument("--ordered", action="store_true", help="write results in input order")
    batch.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr (default: when stderr is a terminal)",
    )

    commands.add_parser(
        "serve",
        add_help=False,
        help="run the reference endpoint (see 'modal-llm serve --help')",
    )
    return parser


# -- running ----------------------------------------------------------------------------------


def _fail(code: int, message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _prepare_stdout() -> None:
    # The toy endpoint answers with emoji; a legacy console encoding must not crash us.
    stream = sys.stdout
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("_", "-")
    if isinstance(stream, io.TextIOWrapper) and encoding not in ("utf-8", "utf8"):
        with contextlib.suppress(ValueError, io.UnsupportedOperation):
            stream.reconfigure(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``modal-llm`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        from .server import main as serve_main

        return serve_main(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.version:
        from . import __version__

        print(f"{PROG} {__version__}")
        return EXIT_OK
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "demo": lambda args: run(_demo(args)),
        "generate": lambda args: run(_generate(args)),
        "batch": _batch,
    }
    if args.command not in handlers:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _prepare_stdout()
    try:
        return handlers[args.command](args)
    except _Exit as exc:
        return _fail(exc.code, exc.message)
    except ModalLLMError as exc:
        failure = _error_exit(exc)
        return _fail(failure.code, failure.message)
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume" if args.command == "batch" else ""
        print(f"{PROG}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _client(args: argparse.Namespace, **options: Any) -> AsyncClient:
    if not args.endpoint and not os.environ.get(ENV_ENDPOINT_URL):
        raise _Exit(EXIT_CONFIG, f"no endpoint: pass --endpoint URL or set ${ENV_ENDPOINT_URL}")
    if args.timeout is not None:
        options["timeout"] = Timeout(args.timeout)
    return AsyncClient(
        args.endpoint or None,
        modal_key=args.modal_key,
        modal_secret=args.modal_secret,
        max_retries=args.max_retries,
        **options,
    )


# -- generate ---------------------------------------------------------------------------------


async def _generate(args: argparse.Namespace) -> int:
    params = dict(args.param)
    out = sys.stdout
    async with _client(args) as client:
        if not args.stream:
            text = await client.generate(args.prompt, stop=args.stop, **params)
            out.write(text + "\n")
            out.flush()
            return EXIT_OK
        last = ""
        async for piece in client.stream(args.prompt, stop=args.stop, **params):
            out.write(piece)
            out.flush()
            last = piece
        if not last.endswith("\n"):
            out.write("\n")
        out.flush()
    return EXIT_OK


# -- progress ---------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on stderr when tqdm is installed, else a plain counter; or nothing."""

    def __init__(self, total: int | None, *, enabled: bool, unit: str = "prompt") -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.enabled = enabled
        self.fallback = False
        self._bar: Any = None
        self._shown_at = 0.0
        self._tty = sys.stderr.isatty()
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.fallback = True
            return
        self._bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def advance(self, *, failed: bool = False) -> None:
        self.done += 1
        if failed:
            self.failed += 1
        if self._bar is not None:
            if failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
            self._bar.update(1)
        elif self.enabled:
            now = time.monotonic()
            if now - self._shown_at >= (0.1 if self._tty else 2.0):
                self._shown_at = now
                self._show()

    def _show(self, end: str = "") -> None:
        total = "" if self.total is None else f"/{self.total}"
        line = f"{self.done}{total} done, {self.failed} failed"
        if self._tty:
            sys.stderr.write(f"\r{line}{end}")
        else:
            sys.stderr.write(f"{line}\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        """Print a line to stderr without breaking the bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            if self.enabled and self._tty and self._shown_at:
                sys.stderr.write("\n")
                self._shown_at = 0.0
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._show(end="\n")


# -- batch ------------------------------------------------------------------------------------


def _id_key(value: object) -> str:
    """Ids compare by their JSON text, so 1 and "1" stay different."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _completed_ids(path: str) -> tuple[set[str], bool]:
    """Ids that OUTPUT already holds a successful result for, and whether it lacks a final
    newline (a line cut short by a crash: it is ignored and the next record starts afresh)."""
    done: set[str] = set()
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return done, False
    except OSError as exc:
        raise _Exit(EXIT_USAGE, f"cannot read {path}: {exc.strerror or exc}") from None
    last = b"\n"
    with handle:
        for raw in handle:
            last = raw
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and "id" in record and "text" in record:
                done.add(_id_key(record["id"]))
    return done, not last.endswith(b"\n")


async def _stdin_chunks(stream: IO[bytes]) -> AsyncIterator[list[bytes]]:
    """Read a pipe in a daemon thread, one chunk of lines at a time, so that a slow producer
    never blocks the event loop and an abort never waits for more input."""
    loop = asyncio.get_running_loop()
    while True:
        future: asyncio.Future[list[bytes]] = loop.create_future()

        def read(future: asyncio.Future[list[bytes]] = future) -> None:
            try:
                outcome = functools.partial(_settle, future, stream.readlines(_READ_CHUNK), None)
            except BaseException as exc:  # handed to the event loop, raised there
                outcome = functools.partial(_settle, future, None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(outcome)

        threading.Thread(target=read, name="modal-llm-stdin", daemon=True).start()
        lines = await future
        if not lines:
            return
        yield lines


def _settle(
    future: asyncio.Future[list[bytes]], lines: list[bytes] | None, exc: BaseException | None
) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(lines or [])


async def _file_chunks(stream: IO[bytes]) -> AsyncIterator[list[bytes]]:
    while True:
        lines = stream.readlines(_READ_CHUNK)
        if not lines:
            return
        yield lines


def _count_items(stream: IO[bytes]) -> int:
    count = sum(1 for line in stream if line.strip())
    stream.seek(0)
    return count


class _BatchInput:
    """INPUT turned lazily into ``BatchItem``s; bad lines are reported and skipped."""

    def __init__(self, name: str, fmt: str, done: set[str], progress: _Progress) -> None:
        self.name = name
        self.fmt = fmt
        self.done = done
        self.progress = progress
        self.bad = 0
        self.skipped = 0

    def _bad(self, lineno: int, message: str) -> None:
        self.bad += 1
        self.progress.advance()
        self.progress.message(f"{self.name}:{lineno}: bad input line: {message}; skipped")

    def parse(self, lineno: int, raw: bytes) -> BatchItem | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._bad(lineno, f"not valid UTF-8 (byte {exc.start + 1})")
            return None
        if not line.strip():
            return None
        if self.fmt == "auto":
            self.fmt = "jsonl" if line.lstrip().startswith("{") else "text"
        if self.fmt == "text":
            item = BatchItem(line.rstrip("\r\n"), id=lineno)
        else:
            parsed = self._parse_json(lineno, line)
            if parsed is None:
                return None
            item = parsed
        if _id_key(item.id) in self.done:
            self.skipped += 1
            self.progress.advance()
            return None
        return item

    def _parse_json(self, lineno: int, line: str) -> BatchItem | None:
        try:
            record = json.loads(line)
        except ValueError as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            self._bad(lineno, f"not valid JSON ({detail})")
            return None
        if not isinstance(record, dict):
            self._bad(lineno, "expected a JSON object with a 'prompt'")
            return None
        prompt = record.pop("prompt", None)
        if not isinstance(prompt, str):
            self._bad(lineno, "'prompt' is missing or not a string")
            return None
        ident = record.pop("id", lineno)
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            self._bad(lineno, "'id' must be a string or an integer")
            return None
        return BatchItem(prompt, id=ident, extra=record)

    async def items(self, chunks: AsyncIterator[list[bytes]]) -> AsyncIterator[BatchItem]:
        lineno = 0
        async for lines in chunks:
            for raw in lines:
                lineno += 1
                item = self.parse(lineno, raw)
                if item is not None:
                    yield item


def _record(result: BatchResult) -> dict[str, Any]:
    record: dict[str, Any] = {"id": result.id}
    if result.error is None:
        record["text"] = result.text
    else:
        error: dict[str, Any] = {
            "type": type(result.error).__name__,
            "message": _one_line(result.error),
        }
        if isinstance(result.error, StatusError):
            error["status"] = result.error.status_code
        record["error"] = error
    record["attempts"] = result.attempts
    record["latency"] = round(result.latency, 4)
    return record


def _open_input(path: str) -> tuple[IO[bytes], bool]:
    """The INPUT stream and whether it is a pipe/terminal (read in a thread)."""
    if path == "-":
        return sys.stdin.buffer, True
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise _Exit(EXIT_USAGE, f"cannot read {path}: {exc.strerror or exc}") from None
    return handle, not os.path.isfile(path)


def _batch(args: argparse.Namespace) -> int:
    to_stdout = args.output == "-"
    done, needs_newline = (set(), False) if to_stdout else _completed_ids(args.output)
    stream, piped = _open_input(args.input)
    with contextlib.ExitStack() as stack:
        if stream is not sys.stdin.buffer:
            stack.enter_context(stream)
        show = sys.stderr.isatty() if args.progress is None else args.progress
        total = _count_items(stream) if show and not piped else None
        progress = _Progress(total, enabled=show)
        stack.callback(progress.close)
        if progress.fallback and args.progress:
            print("(pip install 'modal-llm[progress]' for a progress bar)", file=sys.stderr)
        if to_stdout:
            out: IO[str] = sys.stdout
        else:
            try:
                out = stack.enter_context(open(args.output, "a", encoding="utf-8"))
            except OSError as exc:
                raise _Exit(
                    EXIT_USAGE, f"cannot write {args.output}: {exc.strerror or exc}"
                ) from None
            if needs_newline:
                out.write("\n")
        name = "<stdin>" if args.input == "-" else args.input
        source = _BatchInput(name, args.format, done, progress)
        chunks = functools.partial(_stdin_chunks if piped else _file_chunks, stream)
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
    source: _BatchInput,
    chunks: Callable[[], AsyncIterator[list[bytes]]],
    out: IO[str],
    progress: _Progress,
) -> tuple[int, int]:
    ok = failed = 0
    async with _client(args, max_concurrency=args.concurrency) as client:
        results = fan_out(
            client,
            source.items(chunks()),
            ordered=args.ordered,
            concurrency=args.concurrency,
            rate_limit=args.rate,
            adaptive=args.adaptive,
            stop=args.stop,
            extra=dict(args.param),
        )
        async with contextlib.aclosing(results):
            async for result in results:
                out.write(json.dumps(_record(result), ensure_ascii=False) + "\n")
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
    failure = _error_exit(error)
    raise _Exit(failure.code, f"{failure.message} (stopped the batch; rerun to resume)")


# -- demo -------------------------------------------------------------------------------------

_DEMO_PROMPT: Final = "Explain in one breath why the sky is blue"


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return 0.0
    return values[max(0, math.ceil(q * len(values)) - 1)]


async def _demo(args: argparse.Namespace) -> int:
    from .server import STATS, ServerConfig, create_app, serve

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
        async with AsyncClient(url, max_concurrency=args.concurrency, retry=retry) as client:
            failures: list[str] = []
            client._failure_listeners.append(lambda e: failures.append(_status_of(e)))
            print(f"\nstreaming: {_DEMO_PROMPT!r}")
            async for piece in client.stream(_DEMO_PROMPT):
                out.write(piece)
                out.flush()
            out.write("\n")
            if failures:
                print(f"(the endpoint answered {', '.join(failures)} first; the client retried)")

            count = args.prompts
            print(f"\nfanning out {count} prompts, {args.concurrency} in flight:", flush=True)
            progress = _Progress(count, enabled=args.progress)
            if progress.fallback:
                print("(pip install 'modal-llm[progress]' for a progress bar)", file=sys.stderr)
            prompts = (f"summarise report number {i} for the board" for i in range(count))
            results: list[BatchResult] = []
            started = time.perf_counter()
            try:
                async for result in fan_out(client, prompts, concurrency=args.concurrency):
                    results.append(result)
                    progress.advance(failed=not result.ok)
            finally:
                progress.close()
            elapsed = time.perf_counter() - started
        http_requests = app[STATS].posts
    _summary(results, elapsed, http_requests, args.concurrency)
    return EXIT_OK


def _status_of(error: ModalLLMError) -> str:
    return str(error.status_code) if isinstance(error, StatusError) else type(error).__name__


def _summary(results: list[BatchResult], elapsed: float, http_requests: int, conc: int) -> None:
    errors = sum(1 for r in results if not r.ok)
    retries = sum(max(0, r.attempts - 1) for r in results)
    latencies = sorted(r.latency for r in results)
    sample = next((r for r in results if r.ok), None)
    if sample is not None:
        print(f"\nsample: {sample.prompt!r} -> {sample.text!r}")
    print("\nsummary")
    print(f"  requests:   {len(results)} prompts, {http_requests} HTTP requests in all")
    print(f"  errors:     {errors}")
    print(f"  retries:    {retries} (429/503 answers retried by the client)")
    rate = len(results) / elapsed if elapsed > 0 else 0.0
    print(f"  throughput: {rate:.0f} prompts/s ({elapsed:.2f} s, concurrency {conc})")
    p50, p95 = _percentile(latencies, 0.50), _percentile(latencies, 0.95)
    print(f"  latency:    p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
