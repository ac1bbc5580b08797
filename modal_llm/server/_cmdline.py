"""The command line: ``python -m modal_llm.server`` and ``modal-llm serve``, a flag per switch."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys

from modal_llm._argtypes import (
    OneLineParser,
    count,
    error_status,
    fraction,
    header_value,
    host,
    non_empty,
    port,
    seconds,
)
from modal_llm._exceptions import ConfigError

from ._app import serve
from ._config import STREAM_FORMATS, ServerConfig


def build_parser(*, add_help: bool = True) -> argparse.ArgumentParser:
    """The command line of ``python -m modal_llm.server`` and ``modal-llm serve``.

    ``add_help=False`` makes it usable as a ``parents=[...]`` parser for a subcommand.
    """
    defaults = ServerConfig()
    parser = OneLineParser(
        prog="modal-llm serve",
        add_help=add_help,
        description="Run the reference Modal LLM endpoint (a toy generator, not a model). "
        "Prints its URL on one line once it is ready.",
    )
    add = parser.add_argument

    # Every value is checked here, by its kind (modal_llm._argtypes), so a bad one is a
    # usage error (one line, exit 2) and never reaches the socket or the event loop.
    def duration(flag: str, default: float, text: str, *, positive: bool = False) -> None:
        kind = seconds(positive=positive)
        add(flag, type=kind, default=default, metavar="SECONDS", help=text)

    def number(flag: str, text: str, default: int | None = 0, minimum: int = 0) -> None:
        add(flag, type=count(minimum), default=default, metavar="N", help=text)

    def probability(flag: str, text: str) -> None:
        add(flag, type=fraction, default=0.0, metavar="P", help=text)

    def switch(flag: str, text: str) -> None:
        add(flag, action="store_true", help=text)

    add("--host", type=host, default="127.0.0.1", help="interface to bind (default: %(default)s)")
    add("--port", type=port, default=8000, help="port, 0 for any free one (default: %(default)s)")
    switch("--uvloop", "run on uvloop if it is installed")
    number("--pieces", "pieces per streamed reply (default: %(default)s)", defaults.pieces, 1)
    duration("--piece-delay", 0.0, "pause between streamed pieces")
    duration("--latency", 0.0, "delay before each answer (time to first byte)")
    duration("--cold-start", 0.0, "extra delay for the first request")
    duration("--idle-reset", 0.0, "idle time after which the next request is cold again")
    add(
        "--stream-format",
        choices=STREAM_FORMATS,
        default=defaults.stream_format,
        help="what a streaming request gets (default: %(default)s)",
    )
    number("--rate-limit-every", "every Nth POST gets 429")
    probability("--rate-limit-rate", "this fraction of POSTs gets 429, at random")
    add(
        "--retry-after",
        type=header_value,
        metavar="VALUE",
        help="Retry-After on 429: seconds or an HTTP date",
    )
    number("--error-burst", "the first N POSTs get --error-status")
    add(
        "--error-status",
        type=error_status,
        default=defaults.error_status,
        metavar="STATUS",
        help="status of --error-burst and --poll-error-every (default: %(default)s)",
    )
    probability("--failure-rate", 'this fraction of POSTs gets 500 "modal-http: internal error"')
    add(
        "--modal-key",
        type=header_value,
        metavar="KEY",
        help="require this Modal-Key (with --modal-secret)",
    )
    add(
        "--modal-secret",
        type=header_value,
        metavar="SECRET",
        help="require this Modal-Secret (test values only)",
    )
    duration("--work-time", 0.0, "simulated generation time of a non-streaming reply")
    duration(
        "--hop-time",
        defaults.hop_time,
        "longest block before a 303 (default: %(default)s)",
        positive=True,
    )
    number("--poll-error-every", "every Nth GET of a result URL gets --error-status")
    add(
        "--stream-flag",
        type=non_empty,
        default=defaults.stream_flag,
        metavar="KEY",
        help="body key that asks for a stream (default: %(default)s)",
    )
    number("--sse-comment-every", "SSE: a keep-alive comment before every Nth piece")
    number("--stream-drop-after", "drop the connection after N pieces", None)
    number("--stream-error-after", "send an error after N pieces", None)
    switch("--stream-no-terminator", "SSE streams end without data: [DONE]")
    switch("--split-utf8", "text streams cut multibyte characters across chunks")
    switch("--echo-prompt", "replies start with the prompt")
    add("--seed", type=int, default=0, help="seed of the random faults (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build a :class:`ServerConfig` from :func:`build_parser`'s namespace."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig) if f.name != "gate"
    }
    return ServerConfig(**values)


async def _serve_forever(config: ServerConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not on Windows, nor outside the main thread: Ctrl-C still ends the run there.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    async with serve(config, host, port) as url:
        # Handlers first, then the URL: whoever reads it may signal us at once.
        print(url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the endpoint in the foreground until SIGINT or SIGTERM; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed (one line)
        return exc.code if isinstance(exc.code, int) else 2
    if (args.modal_key is None) != (args.modal_secret is None):  # named as flags, not fields
        given, missing = "--modal-key", "--modal-secret"
        if args.modal_key is None:
            given, missing = missing, given
        print(f"{parser.prog}: error: {given} needs {missing} too", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"modal-llm serve: error: {exc}", file=sys.stderr)
        return 2
    coro = _serve_forever(config, args.host, args.port)
    try:
        if args.uvloop:
            try:
                import uvloop
            except ImportError:
                print("modal-llm serve: uvloop is not installed; using asyncio", file=sys.stderr)
            else:
                uvloop.run(coro)
                return 0
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"modal-llm serve: error: {exc}", file=sys.stderr)
        return 1
    return 0
