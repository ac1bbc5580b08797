"""Command-line value types shared by ``modal-llm``'s commands and the reference endpoint's.

Each kind of value (a port, a count, a duration, a rate, a fraction, an HTTP status, a
header value, a host) is checked once, when the command line is parsed, so that a bad
value is refused with one usage line and exit status 2 instead of failing later with a
traceback (a port of 99999 used to reach ``socket.bind``; a latency of ``nan`` or ``1e300``
reached the event loop's timers). :class:`OneLineParser` prints a usage error as that one
line, ``PROG: error: argument --flag: why (see 'PROG --help')``. Standard library only.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Final, NoReturn

__all__ = [
    "MAX_CONCURRENCY",
    "MAX_SECONDS",
    "OneLineParser",
    "count",
    "error_status",
    "fraction",
    "header_value",
    "host",
    "no_control_characters",
    "non_empty",
    "per_second",
    "port",
    "seconds",
    "stop_sequence",
]

MAX_SECONDS: Final = 7 * 24 * 3600.0
"""The longest duration a flag takes: a week. Longer ones are typos (``1e300``), and some
overflow an event loop's timer (uvloop counts milliseconds in 64 bits)."""

MAX_CONCURRENCY: Final = 10_000
"""The most requests in flight a command asks for: each holds a connection (a file
descriptor) and the fan-out starts one worker per slot, so ``--concurrency 1000000``
spent gigabytes and minutes before sending anything."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr, then exit 2.

    ``modal-llm generate: error: argument --timeout: must be a positive number of seconds,
    not -1 (see 'modal-llm generate --help')``. Subparsers made by ``add_subparsers`` are of
    this class too.
    """

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and the help hint on one line; exit 2."""
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def count(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    """A whole number from ``minimum`` to ``maximum`` (no upper bound when None)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {value}")
        return value

    parse.__name__ = "count"
    return parse


def port(text: str) -> int:
    """A TCP port to listen on: 0 (any free port) to 65535."""
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, not {value}")
    return value


def seconds(*, positive: bool = False) -> Callable[[str], float]:
    """A duration in seconds: finite, at most :data:`MAX_SECONDS`, > 0 or >= 0."""

    def parse(text: str) -> float:
        value = _number(text)
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
        if value > MAX_SECONDS:
            raise argparse.ArgumentTypeError(
                f"must be at most {MAX_SECONDS:.0f} seconds (a week), not {text}"
            )
        return value

    parse.__name__ = "seconds"
    return parse


def per_second(text: str) -> float:
    """A rate (events per second): > 0, finite, and at least one per :data:`MAX_SECONDS`."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive rate, not {text}")
    if 1 / value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at least 1/{MAX_SECONDS:.0f} (one a week), not {text}"
        )
    return value


def fraction(text: str) -> float:
    """A probability from 0 to 1."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, not {text}")
    return value


def error_status(text: str) -> int:
    """An HTTP error status, 400 to 599."""
    value = _integer(text)
    if not 400 <= value <= 599:
        raise argparse.ArgumentTypeError(f"must be a 4xx or 5xx status, not {value}")
    return value


def no_control_characters(text: str) -> str:
    """Text without control characters (CR, LF, NUL, ...): it goes into an HTTP header."""
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise argparse.ArgumentTypeError("must not hold a control character (CR, LF, NUL, ...)")
    return text


def header_value(text: str) -> str:
    """A non-empty HTTP header value (no control characters)."""
    return no_control_characters(non_empty(text))


def non_empty(text: str) -> str:
    """Any text but the empty string (or only spaces)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def stop_sequence(text: str) -> str:
    """A stop sequence: any text but the empty string (a blank line, ``"\\n\\n"``, is the
    most common one), as the library's ``stop=`` takes."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def host(text: str) -> str:
    """A host name or IP address to listen on (it must encode as IDNA)."""
    name = non_empty(text).strip()
    if ":" in name:  # an IPv6 address: the socket layer checks it
        return name
    try:
        name.encode("idna")
    except UnicodeError:
        raise argparse.ArgumentTypeError(f"is not a valid host name: {text!r}") from None
    return name
