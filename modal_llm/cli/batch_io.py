"""The files of ``modal-llm batch``: INPUT parsed lazily into items, OUTPUT records, resume.

Input is read a chunk of lines at a time (a pipe in a daemon thread, so a slow producer
never blocks the event loop); OUTPUT is append-only JSONL, and the ids it already holds a
``"text"`` for are skipped on a rerun.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
import threading
from collections.abc import AsyncIterator
from typing import IO, Any, Final

from .._exceptions import StatusError
from .._fanout import BatchItem, BatchResult
from .._progress import Progress
from .common import EXIT_USAGE, CliExit, one_line

__all__ = [
    "BatchInput",
    "completed_ids",
    "count_items",
    "file_chunks",
    "id_key",
    "open_input",
    "record",
    "stdin_chunks",
]

_READ_CHUNK: Final = 64 * 1024


def id_key(value: object) -> str:
    """Ids compare by their JSON text, so 1 and "1" stay different."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def completed_ids(path: str) -> tuple[set[str], bool]:
    """Ids that OUTPUT already holds a successful result for, and whether it lacks a final
    newline (a line cut short by a crash: it is ignored and the next record starts afresh)."""
    done: set[str] = set()
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return done, False
    except OSError as exc:
        raise CliExit(EXIT_USAGE, f"cannot read {path}: {exc.strerror or exc}") from None
    last = b"\n"
    with handle:
        for raw in handle:
            last = raw
            try:
                parsed = json.loads(raw)
            except ValueError:
                continue
            if isinstance(parsed, dict) and "id" in parsed and "text" in parsed:
                done.add(id_key(parsed["id"]))
    return done, not last.endswith(b"\n")


async def stdin_chunks(stream: IO[bytes]) -> AsyncIterator[list[bytes]]:
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


async def file_chunks(stream: IO[bytes]) -> AsyncIterator[list[bytes]]:
    """A regular file, one chunk of lines at a time."""
    while True:
        lines = stream.readlines(_READ_CHUNK)
        if not lines:
            return
        yield lines


def count_items(stream: IO[bytes]) -> int:
    """Non-blank lines of a seekable ``stream``, which is rewound."""
    count = sum(1 for line in stream if line.strip())
    stream.seek(0)
    return count


class BatchInput:
    """INPUT turned lazily into ``BatchItem``s; bad lines are reported and skipped."""

    def __init__(self, name: str, fmt: str, done: set[str], progress: Progress) -> None:
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
        """The item of one input line, or None (blank, bad, or already done)."""
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
        if id_key(item.id) in self.done:
            self.skipped += 1
            self.progress.advance()
            return None
        return item

    def _parse_json(self, lineno: int, line: str) -> BatchItem | None:
        try:
            parsed = json.loads(line)
        except ValueError as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            self._bad(lineno, f"not valid JSON ({detail})")
            return None
        if not isinstance(parsed, dict):
            self._bad(lineno, "expected a JSON object with a 'prompt'")
            return None
        prompt = parsed.pop("prompt", None)
        if not isinstance(prompt, str):
            self._bad(lineno, "'prompt' is missing or not a string")
            return None
        ident = parsed.pop("id", lineno)
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            self._bad(lineno, "'id' must be a string or an integer")
            return None
        return BatchItem(prompt, id=ident, extra=parsed)

    async def items(self, chunks: AsyncIterator[list[bytes]]) -> AsyncIterator[BatchItem]:
        """The items of ``chunks`` of input lines, in order."""
        lineno = 0
        async for lines in chunks:
            for raw in lines:
                lineno += 1
                item = self.parse(lineno, raw)
                if item is not None:
                    yield item


def record(result: BatchResult) -> dict[str, Any]:
    """The OUTPUT record of one result (docs/cli.md, "Output")."""
    out: dict[str, Any] = {"id": result.id}
    if result.error is None:
        out["text"] = result.text
    else:
        error: dict[str, Any] = {
            "type": type(result.error).__name__,
            "message": one_line(result.error),
        }
        if isinstance(result.error, StatusError):
            error["status"] = result.error.status_code
        out["error"] = error
    out["attempts"] = result.attempts
    out["latency"] = round(result.latency, 4)
    return out


def open_input(path: str) -> tuple[IO[bytes], bool]:
    """The INPUT stream and whether it is a pipe/terminal (read in a thread)."""
    if path == "-":
        return sys.stdin.buffer, True
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise CliExit(EXIT_USAGE, f"cannot read {path}: {exc.strerror or exc}") from None
    return handle, not os.path.isfile(path)
