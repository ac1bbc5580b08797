"""What every ``modal-llm`` command shares: exit statuses, one-line errors, endpoint options.

Expected failures end a command with ``CliExit`` (one line on stderr, a distinct exit
status, never a traceback); docs/cli.md lists the statuses.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any, Final

from .._argtypes import count, seconds, stop_sequence
from .._client import AsyncClient
from .._config import DEFAULT_MAX_RETRIES, ENV_ENDPOINT_URL, ENV_KEY, ENV_SECRET, Timeout
from .._exceptions import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ContractError,
    EndpointTimeoutError,
    ModalLLMError,
    RedirectError,
    ReplyTooLargeError,
    ResultPendingError,
    TransportError,
    printable,
)

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
    "PROG",
    "CliExit",
    "endpoint_options",
    "error_exit",
    "error_text",
    "fail",
    "guarded_stdout",
    "make_client",
    "one_line",
    "prepare_stdout",
    "silence_stdout",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""generate: the request failed; batch: at least one item failed (see OUTPUT)."""
EXIT_USAGE: Final = 2
"""Bad arguments, or INPUT/OUTPUT cannot be read or written (argparse uses 2 as well)."""
EXIT_CONFIG: Final = 3
"""Bad or missing endpoint URL, key without secret, another invalid option, or an endpoint
that does not speak the contract."""
EXIT_UNREACHABLE: Final = 4
"""The endpoint could not be reached (refused, DNS, TLS, timeout)."""
EXIT_AUTH: Final = 5
"""The endpoint refused the credentials (401/403)."""
EXIT_BAD_INPUT: Final = 6
"""batch: some input lines were invalid (and skipped); every valid item succeeded."""
EXIT_INTERRUPTED: Final = 130
"""Ctrl-C. batch: what finished is in OUTPUT; rerun the same command to resume."""
EXIT_TERMINATED: Final = 143
"""SIGTERM (128 + 15): handled as Ctrl-C is."""

EXIT_CODES: Final = {
    EXIT_OK: "success",
    EXIT_FAILED: "the request failed / some batch items failed",
    EXIT_USAGE: "usage error, or INPUT/OUTPUT cannot be read or written",
    EXIT_CONFIG: "bad or missing endpoint URL or option, or not a contract endpoint",
    EXIT_UNREACHABLE: "endpoint unreachable",
    EXIT_AUTH: "authentication failed",
    EXIT_BAD_INPUT: "batch: bad input lines (skipped)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_TERMINATED: "terminated (SIGTERM)",
}

MAX_RETRIES: Final = 1000
"""The most retries ``--max-retries`` takes (retrying for ever is a shell loop's job)."""

PROG: Final = "modal-llm"
AUTH_HINT: Final = "set MODAL_LLM_KEY and MODAL_LLM_SECRET, or pass --modal-key/--modal-secret"


class CliExit(Exception):
    """End the command with ``code`` after printing ``message`` (one line) to stderr.

    ``error=False`` prints ``modal-llm: message`` (an interruption is not an error).
    """

    def __init__(self, code: int, message: str, *, error: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error = error


def one_line(value: object) -> str:
    """``value`` as text on one line (newlines and runs of spaces become one space)."""
    return " ".join(str(value).split())


def error_text(exc: BaseException) -> str:
    """The message of ``exc`` on one line (the library words a body cut short itself:
    "the connection closed mid-body after N bytes", with no aiohttp status in it)."""
    return one_line(exc)


def error_exit(exc: ModalLLMError, *, replies: int = 1) -> CliExit:
    """The exit status and message of an error that ends a command: the one mapping, used
    by every command (docs/cli.md, "Exit statuses").

    ``replies`` is how many replies in a row failed the contract (``batch`` stops after a
    few), for the message of a ``ContractError``.
    """
    text = error_text(exc)
    if isinstance(exc, ConfigError):
        return CliExit(EXIT_CONFIG, text)
    if isinstance(exc, AuthenticationError):
        return CliExit(EXIT_AUTH, f"authentication failed: {text}; {AUTH_HINT}")
    if isinstance(exc, ContractError) and not isinstance(exc, ReplyTooLargeError):
        if replies > 1:
            text = (
                f'its first {replies} replies were not a JSON object with the text under "prompt"'
                f" (the last: {text})"
            )
        return CliExit(
            EXIT_CONFIG,
            f"the endpoint does not speak the contract: {text}; check --endpoint or "
            f"${ENV_ENDPOINT_URL}",
        )
    if isinstance(exc, (ResultPendingError, EndpointTimeoutError)):
        return CliExit(EXIT_UNREACHABLE, f"the endpoint did not answer in time: {text}")
    if isinstance(exc, RedirectError):  # a 307/308 or a malformed Location: not Modal's 303
        return CliExit(
            EXIT_CONFIG,
            f"the endpoint redirected in a way the contract does not allow: {text}; check "
            f"--endpoint or ${ENV_ENDPOINT_URL}",
        )
    if isinstance(exc, ConnectError) and not exc.before_response:
        return CliExit(EXIT_FAILED, f"the reply was cut short: {text}")
    if isinstance(exc, TransportError):
        return CliExit(EXIT_UNREACHABLE, f"cannot reach the endpoint: {text}")
    return CliExit(EXIT_FAILED, text)


def fail(code: int, message: str, *, error: bool = True) -> int:
    """Print ``modal-llm: error: message`` (or ``modal-llm: message``) on stderr; return
    ``code``."""
    # Messages quote servers and input files: no terminal escape sequence gets through.
    print(f"{PROG}: {'error: ' if error else ''}{printable(message)}", file=sys.stderr)
    return code


def prepare_stdout() -> None:
    """The toy endpoint answers with emoji; a legacy console encoding must not crash us."""
    stream = sys.stdout
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("_", "-")
    if isinstance(stream, io.TextIOWrapper) and encoding not in ("utf-8", "utf8"):
        with contextlib.suppress(ValueError, io.UnsupportedOperation):
            stream.reconfigure(errors="replace")


class _GuardedStdout:
    """``sys.stdout`` while a command runs: a failed write or flush (a full disk, a closed
    pipe) ends the command with one line and exit 2, in every command alike."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            written: int = self._stream.write(text)
        except OSError as exc:
            raise self._failed(exc) from None
        return written

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> CliExit:
        silence_stdout()
        return CliExit(EXIT_USAGE, f"cannot write to stdout: {exc.strerror or one_line(exc)}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def guarded_stdout() -> Iterator[None]:
    """Make ``sys.stdout`` a :class:`_GuardedStdout` for the ``with`` block."""
    original = sys.stdout
    guard = _GuardedStdout(original)
    sys.stdout = guard
    try:
        yield
    finally:
        if sys.stdout is guard:
            sys.stdout = original


def silence_stdout() -> None:
    """After stdout broke (a closed pipe, a full disk), point it at /dev/null so that the
    interpreter's last flush does not print a second error."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# -- argument types ---------------------------------------------------------------------------


_CLIENT_ARGUMENTS: Final = {
    "stop": "use --stop (or a per-item 'stop' key in batch JSONL)",
    "timeout": "use --timeout",
    "headers": "headers are not set from the command line",
}


def _param(text: str) -> tuple[str, Any]:
    """``key=value``; the value is JSON when it parses as JSON, else the string itself."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, not {text!r}")
    if key == "prompt":
        raise argparse.ArgumentTypeError("'prompt' is not a model argument; pass the prompt itself")
    if key in _CLIENT_ARGUMENTS:
        # generate(prompt, stop=, headers=, timeout=, **extra) would take these itself.
        raise argparse.ArgumentTypeError(
            f"{key!r} names a client option, not a model argument: {_CLIENT_ARGUMENTS[key]}"
        )
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except ValueError:
        value = raw  # not JSON: the text itself
    if isinstance(value, float) and not math.isfinite(value):  # 1e999
        raise argparse.ArgumentTypeError(f"{raw} is out of range for a JSON number")
    return key, value


def _not_json(name: str) -> object:
    raise argparse.ArgumentTypeError(
        f"{name} is not a JSON number (JSON has no NaN or Infinity); to send the text, "
        f"quote it in JSON: '\"{name}\"'"
    )


def endpoint_options() -> argparse.ArgumentParser:
    """The options of every command that talks to an endpoint (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("endpoint")
    add = group.add_argument
    add("--endpoint", metavar="URL", help=f"endpoint URL (default: ${ENV_ENDPOINT_URL})")
    add("--modal-key", metavar="KEY", help="proxy auth key (default: $MODAL_LLM_KEY)")
    add("--modal-secret", metavar="SECRET", help="proxy auth secret (default: $MODAL_LLM_SECRET)")
    add(
        "--timeout",
        type=seconds(positive=True),
        metavar="SECONDS",
        help="connect, first-byte and read timeout (default: the client's, which waits for "
        "cold starts)",
    )
    add(
        "--max-retries",
        type=count(0, MAX_RETRIES),
        metavar="N",
        help=f"retries per request after the first attempt (default: {DEFAULT_MAX_RETRIES})",
    )
    add(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model argument sent with every prompt; VALUE is JSON if it parses (repeatable)",
    )
    add(
        "--stop",
        type=stop_sequence,
        action="append",
        metavar="TEXT",
        help="stop sequence, e.g. $'\\n\\n' (repeatable)",
    )
    return parent


def make_client(args: argparse.Namespace, **options: Any) -> AsyncClient:
    """The client described by the endpoint options in ``args``."""
    if not args.endpoint and not os.environ.get(ENV_ENDPOINT_URL):
        raise CliExit(EXIT_CONFIG, f"no endpoint: pass --endpoint URL or set ${ENV_ENDPOINT_URL}")
    # The library names its own arguments; on the command line they are options. An empty
    # value counts as missing, as the library counts it.
    key, secret = args.modal_key or None, args.modal_secret or None
    for given, option, other, env in (
        (key, "--modal-key", secret, ENV_SECRET),
        (secret, "--modal-secret", key, ENV_KEY),
    ):
        if given is not None and other is None and not os.environ.get(env):
            missing = "--modal-secret" if option == "--modal-key" else "--modal-key"
            raise CliExit(
                EXIT_CONFIG,
                f"{option} was given but not {missing}, and ${env} is not set: pass "
                f"{missing} or set ${env} (the key and secret must be given together)",
            )
    if args.timeout is not None:
        options["timeout"] = Timeout(args.timeout)
    return AsyncClient(
        args.endpoint or None,
        modal_key=key,
        modal_secret=secret,
        max_retries=args.max_retries,
        **options,
    )
