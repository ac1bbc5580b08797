"""``modal-llm generate PROMPT``: send one prompt and print the answer (``-``: read stdin)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._exceptions import StreamInterruptedError
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliExit, error_text, make_client
from .interrupts import Interrupts

__all__ = ["add_parser", "generate"]


def add_parser(commands: Any, endpoint: argparse.ArgumentParser) -> None:
    """Register ``generate`` on the ``commands`` subparsers."""
    gen = commands.add_parser(
        "generate",
        parents=[endpoint],
        help="send one prompt and print the answer",
        description="Send PROMPT to the endpoint and print the generated text.",
    )
    gen.add_argument(
        "prompt",
        metavar="PROMPT",
        help="the prompt; - reads it from stdin (one final line ending is removed)",
    )
    gen.add_argument("--stream", action="store_true", help="print the answer as it arrives")


def _read_prompt(arg: str) -> str:
    if arg != "-":
        return arg
    try:
        text = sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliExit(EXIT_USAGE, f"stdin is not UTF-8 text (byte {exc.start + 1})") from None
    except OSError as exc:
        raise CliExit(EXIT_USAGE, f"cannot read stdin: {exc.strerror or exc}") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def generate(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """Run ``generate``; return the exit status (errors propagate to ``main``).

    The prompt is read before the event loop starts: a blocking read of stdin inside it
    would outlast Ctrl-C and SIGTERM (they cancel the loop's task, which a read in progress
    does not see) until stdin ends.
    """
    return interrupts.run(_generate(args, _read_prompt(args.prompt)))


async def _generate(args: argparse.Namespace, prompt: str) -> int:
    params = dict(args.param)
    out = sys.stdout
    async with make_client(args) as client:
        if not args.stream:
            text = await client.generate(prompt, stop=args.stop, **params)
            out.write(text + "\n")
            out.flush()
            return EXIT_OK
        pieces = chars = 0
        line_open = False  # the last text printed did not end a line
        try:
            # Closed on every way out (an error, Ctrl-C, stdout gone), which frees its slot.
            async with client.stream(prompt, stop=args.stop, **params) as stream:
                async for piece in stream:
                    out.write(piece)
                    out.flush()
                    pieces += 1
                    chars += len(piece)
                    if piece:
                        line_open = not piece.endswith("\n")
        except StreamInterruptedError as exc:
            _end_line(line_open)
            raise CliExit(EXIT_FAILED, _cut_short(exc, pieces, chars)) from None
        except CliExit:  # stdout cannot be written: nothing more goes there
            raise
        except BaseException:  # Ctrl-C or an error: its message must start on a new line
            _end_line(line_open)
            raise
        _end_line(line_open or not chars)
    return EXIT_OK


def _end_line(line_open: bool) -> None:
    if line_open:
        sys.stdout.write("\n")
    sys.stdout.flush()


def _cut_short(exc: StreamInterruptedError, pieces: int, chars: int) -> str:
    got = f"after {pieces} pieces ({chars} characters, printed above)"
    text = error_text(exc)
    if exc.ended_by == "connection":
        return f"the connection closed mid-reply {got}; the answer is incomplete"
    return f"the stream ended early {got}: {text}"
