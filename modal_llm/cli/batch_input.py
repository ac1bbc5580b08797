"""INPUT of ``modal-llm batch``: the paths checked, lines read lazily into items, ids checked.

INPUT is JSONL, plain text (one prompt per line) or Parquet (``parquet.py``). A regular
file is scanned once before anything is sent (duplicate ids are refused there, and the
count feeds the progress bar); stdin is read as its lines arrive, in a daemon thread,
so a slow producer never blocks the event loop, and its ids are checked as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Final

from .._batch import BatchItem
from .._progress import Progress
from .common import EXIT_USAGE, CliExit, one_line

__all__ = [
    "BatchInput",
    "IdCheck",
    "check_paths",
    "id_key",
    "is_parquet",
    "os_problem",
    "scan_lines",
]

_READ_CHUNK: Final = 64 * 1024
_DUPLICATES_SHOWN: Final = 5


def id_key(value: object) -> str:
    """Ids compare by their JSON text, so 1 and "1" stay different."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def is_parquet(path: str) -> bool:
    """Whether ``path`` names a Parquet file (by its extension)."""
    return path.lower().endswith(".parquet")


def os_problem(exc: OSError) -> str:
    """The reason of an ``OSError`` in words (``No space left on device``)."""
    return exc.strerror or one_line(exc)


# -- paths ------------------------------------------------------------------------------------


def check_paths(input_path: str, output_path: str) -> None:
    """Refuse OUTPUT that is a directory or the INPUT file itself (also by another name)."""
    if output_path == "-":
        return
    if os.path.isdir(output_path):
        raise CliExit(
            EXIT_USAGE,
            f"OUTPUT {output_path} is a directory: -o names the results file, e.g. "
            f"-o {os.path.join(output_path, 'results.jsonl')}",
        )
    parent = os.path.dirname(output_path) or "."
    if not os.path.isdir(parent):
        raise CliExit(
            EXIT_USAGE, f"cannot create OUTPUT {output_path}: the directory {parent} does not exist"
        )
    try:
        out_stat = os.stat(output_path)
    except OSError:
        return  # not there yet: it cannot be the input
    try:
        in_stat = os.fstat(sys.stdin.fileno()) if input_path == "-" else os.stat(input_path)
    except (OSError, ValueError):  # io.UnsupportedOperation: stdin is no file
        return
    if (in_stat.st_dev, in_stat.st_ino) == (out_stat.st_dev, out_stat.st_ino):
        shown = "stdin" if input_path == "-" else input_path
        same = "" if shown == output_path else f" ({shown} and {output_path} are one file)"
        raise CliExit(
            EXIT_USAGE,
            f"INPUT and OUTPUT are the same file{same}: results would be appended to the "
            "prompts; write them to another file",
        )


# -- ids --------------------------------------------------------------------------------------


@dataclass
class IdCheck:
    """Every id once; and, for Parquet OUTPUT, every id of one kind (int or str).

    ``kind`` is the kind OUTPUT already holds (a Parquet file being resumed), if any.
    """

    name: str
    unit: str = "line"
    one_kind: bool = False
    kind: str | None = None
    kind_from: str = ""
    seen: dict[str, int] = field(default_factory=dict)
    duplicates: list[tuple[object, int, int]] = field(default_factory=list)
    count: int = 0

    def see(self, ident: object, where: int) -> None:
        """Record the id of line/row ``where``; raise ``CliExit`` on a kind mismatch."""
        key = id_key(ident)
        first = self.seen.setdefault(key, where)
        if first != where:
            self.count += 1
            if len(self.duplicates) < _DUPLICATES_SHOWN:
                self.duplicates.append((ident, first, where))
        if not self.one_kind:
            return
        kind = "int" if isinstance(ident, int) else "str"
        if self.kind is None:
            self.kind, self.kind_from = kind, f"{self.unit} {where}"
        elif kind != self.kind:
            words = {"int": "an integer", "str": "a string"}
            raise CliExit(
                EXIT_USAGE,
                f"{self.name}: {self.unit} {where} has {words[kind]} id ({id_key(ident)}) but "
                f"{self.kind_from} {words[self.kind]} one: a Parquet OUTPUT holds ids of one "
                "type; make them all strings or all integers",
            )

    def refuse_duplicates(self, *, sent: bool) -> None:
        """Raise ``CliExit`` naming the duplicates seen, if any."""
        if not self.duplicates:
            return
        shown = ", ".join(
            f"{id_key(ident)} on {self.unit}s {first} and {again}"
            for ident, first, again in self.duplicates
        )
        more = f" ({self.count} in all)" if self.count > len(self.duplicates) else ""
        stopped = "stopped before sending it" if sent else "nothing was sent"
        raise CliExit(
            EXIT_USAGE,
            f"duplicate ids in {self.name}: {shown}{more}; every item needs its own id "
            f"(resuming goes by id); {stopped}",
        )


# -- input ------------------------------------------------------------------------------------


def _item(record: dict[str, Any], where: int) -> BatchItem | str:
    """The item of one JSON object or Parquet row, or what is wrong with it."""
    prompt = record.pop("prompt", None)
    if not isinstance(prompt, str):
        return "'prompt' is missing or not a string"
    ident = record.pop("id", None)
    if ident is None:
        ident = where
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        return "'id' must be a string or an integer"
    return BatchItem(prompt, id=ident, extra=record)


def _decode(raw: bytes, fmt: str, where: int) -> BatchItem | str | None:
    """The item of one input line, what is wrong with it, or None (blank)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (byte {exc.start + 1})"
    if not line.strip():
        return None
    if fmt == "text":
        return BatchItem(line.rstrip("\r\n"), id=where)
    try:
        parsed = json.loads(line)
    except json.JSONDecodeError as exc:
        return _json_problem(exc, len(line.rstrip("\r\n")))
    except ValueError as exc:  # e.g. a number too long to convert
        return f"not valid JSON ({one_line(exc)})"
    if not isinstance(parsed, dict):
        return "expected a JSON object with a 'prompt'"
    return _item(parsed, where)


def _json_problem(exc: json.JSONDecodeError, length: int) -> str:
    """What is wrong with a JSON line of ``length`` characters, in words."""
    if "Unterminated string" in exc.msg or ("control character" in exc.msg and exc.pos >= length):
        return (
            "not valid JSON: a string is not closed before the end of the line (an object "
            "must be on one line; write a newline inside a string as \\n)"
        )
    if exc.pos >= length:
        return f"not valid JSON: the line ends before the object does ({exc.msg})"
    at = "" if exc.msg.endswith(" at") else " at"
    return f"not valid JSON: {exc.msg}{at} column {exc.colno}"


def first_format(raw: bytes) -> str | None:
    """``jsonl`` or ``text`` for the first non-blank line (``--format auto``), None if blank."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "text"
    if not line.strip():
        return None
    return "jsonl" if line.lstrip().startswith("{") else "text"


def scan_lines(stream: IO[bytes], fmt: str, check: IdCheck) -> tuple[str, int]:
    """Read a seekable INPUT once: its format (``auto`` resolved), its item count, and every
    id into ``check``. The stream is rewound."""
    count = 0
    for where, raw in enumerate(stream, 1):
        if fmt == "auto":
            fmt = first_format(raw) or "auto"
        if fmt == "auto":
            continue
        if fmt == "text":
            if raw.strip():
                count += 1
                if count == 1 and check.one_kind:
                    check.see(where, where)  # ids are line numbers: unique integers
            continue
        item = _decode(raw, fmt, where)
        if isinstance(item, BatchItem):
            count += 1
            check.see(item.id, where)
        elif isinstance(item, str):
            count += 1  # a bad line still advances the progress bar
    stream.seek(0)
    return fmt, count


async def _stdin_chunks(stream: IO[bytes]) -> AsyncIterator[list[bytes]]:
    """Read a pipe in a daemon thread, whatever has arrived at a time (``read1``), so that
    a slow producer never blocks the event loop, each whole line is sent as soon as it
    arrives (``readlines(hint)`` waited for 64 KiB or the end), and an abort never waits
    for more input."""
    loop = asyncio.get_running_loop()
    read1 = getattr(stream, "read1", stream.read)
    pending = b""
    while True:
        future: asyncio.Future[bytes] = loop.create_future()

        def read(future: asyncio.Future[bytes] = future) -> None:
            try:
                outcome = functools.partial(_settle, future, read1(_READ_CHUNK), None)
            except BaseException as exc:  # handed to the event loop, raised there
                outcome = functools.partial(_settle, future, None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(outcome)

        threading.Thread(target=read, name="modal-llm-stdin", daemon=True).start()
        data = await future
        if not data:  # the end: a last line without its newline is still a line
            if pending:
                yield [pending]
            return
        pending += data
        end = pending.rfind(b"\n") + 1
        if end:
            whole, pending = pending[:end], pending[end:]
            yield [line + b"\n" for line in whole[:-1].split(b"\n")]


def _settle(future: asyncio.Future[bytes], data: bytes | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(data or b"")


async def _file_chunks(stream: IO[bytes]) -> AsyncIterator[list[bytes]]:
    while True:
        lines = stream.readlines(_READ_CHUNK)
        if not lines:
            return
        yield lines


class BatchInput:
    """INPUT turned lazily into ``BatchItem``s; bad lines are reported and skipped, items
    already done in OUTPUT are skipped, and (when INPUT was not scanned first, as a pipe
    cannot be) ids are checked as they come."""

    def __init__(
        self,
        name: str,
        fmt: str,
        done: set[str],
        progress: Progress,
        check: IdCheck,
        *,
        stream: IO[bytes] | None,
        scanned: bool,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.fmt = fmt
        self.done = done
        self.progress = progress
        self.check = check
        self.stream = stream
        self.scanned = scanned
        self.params = params or {}
        self.bad = 0
        self.skipped = 0
        self._rows: Iterator[tuple[int, dict[str, Any]]] | None = None

    def parquet(self, rows: Iterator[tuple[int, dict[str, Any]]]) -> None:
        """Read ``(row number, columns)`` pairs instead of lines."""
        self._rows = rows

    def _bad(self, where: int, message: str) -> None:
        self.bad += 1
        self.progress.advance()
        place = f"{where}" if self.check.unit == "line" else f" {self.check.unit} {where}"
        unit = self.check.unit
        self.progress.message(f"{self.name}:{place}: bad input {unit}: {message}; skipped")

    def accept(self, where: int, item: BatchItem | str | None) -> BatchItem | None:
        """The item to send for line/row ``where``, or None (blank, bad or already done)."""
        if item is None:
            return None
        if isinstance(item, str):
            self._bad(where, item)
            return None
        if not self.scanned:
            self.check.see(item.id, where)
            self.check.refuse_duplicates(sent=True)
        if id_key(item.id) in self.done:
            self.skipped += 1
            self.progress.advance()
            return None
        if self.params:  # the item's own arguments win over --param
            return BatchItem(item.prompt, id=item.id, extra={**self.params, **item.extra})
        return item

    async def items(self) -> AsyncIterator[BatchItem]:
        """The items of INPUT, in order."""
        if self._rows is not None:
            for where, row in self._rows:
                columns = {k: v for k, v in row.items() if v is not None}
                item = self.accept(where, _item(columns, where))
                if item is not None:
                    yield item
            return
        assert self.stream is not None
        chunks = (_file_chunks if self.scanned else _stdin_chunks)(self.stream)
        where = 0
        try:
            async for lines in chunks:
                for raw in lines:
                    where += 1
                    if self.fmt == "auto":
                        self.fmt = first_format(raw) or "auto"
                        if self.fmt == "auto":
                            continue
                    item = self.accept(where, _decode(raw, self.fmt, where))
                    if item is not None:
                        yield item
        except OSError as exc:
            raise CliExit(
                EXIT_USAGE, f"cannot read INPUT {self.name} after line {where}: {os_problem(exc)}"
            ) from None
