"""The ``modal-llm`` command: ``demo``, ``generate``, ``batch`` and ``serve``.

One module per command (``demo``, ``generate``, ``batch`` with its files in ``batch_input``,
``batch_output`` and ``parquet``, ``serve``), and ``common`` for what they share. Expected
failures end with one line on stderr and a distinct exit status (``EXIT_CODES``,
docs/cli.md), never a traceback. tqdm, uvloop, pyarrow and the reference endpoint are
imported only when a command needs them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .._argtypes import OneLineParser
from .._exceptions import ModalLLMError
from . import batch as _batch
from . import demo as _demo
from . import generate as _generate
from .common import (
    EXIT_AUTH,
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    PROG,
    CliExit,
    endpoint_options,
    error_exit,
    fail,
    guarded_stdout,
    prepare_stdout,
)
from .interrupts import Interrupts, Terminated, interruption
from .serve import serve

__all__ = [
    "EXIT_AUTH",
    "EXIT_BAD_INPUT",
    "EXIT_CODES",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``modal-llm`` argument parser (``serve`` is handed to ``modal_llm.server``)."""
    parser = OneLineParser(
        prog=PROG,
        description="Client, batch runner and local reference endpoint for LLM web "
        "endpoints on Modal.",
        epilog="exit status: "
        + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    endpoint = endpoint_options()
    _demo.add_parser(commands)
    _generate.add_parser(commands, endpoint)
    _batch.add_parser(commands, endpoint)
    commands.add_parser(
        "serve",
        add_help=False,
        help="run the reference endpoint (see 'modal-llm serve --help')",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``modal-llm`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        return serve(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.version:
        from .. import __version__

        print(f"{PROG} {__version__}")
        return EXIT_OK
    handlers: dict[str, Callable[[argparse.Namespace, Interrupts], int]] = {
        "demo": lambda args, interrupts: interrupts.run(_demo.demo(args)),
        "generate": _generate.generate,
        "batch": _batch.batch,
    }
    if args.command not in handlers:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    prepare_stdout()
    # One handling of every way a command ends: CliExit, the library's errors (one
    # mapping to exit statuses, error_exit), Ctrl-C and SIGTERM (Interrupts), and a
    # stdout that cannot be written (guarded_stdout).
    with Interrupts() as interrupts, guarded_stdout():
        try:
            return handlers[args.command](args, interrupts)
        except CliExit as exc:
            return fail(exc.code, exc.message, error=exc.error)
        except ModalLLMError as exc:
            failure = error_exit(exc)
            return fail(failure.code, failure.message)
        except (KeyboardInterrupt, Terminated) as exc:  # batch adds how to resume
            name, code = interruption(exc)
            return fail(code, f"interrupted by {name}", error=False)
