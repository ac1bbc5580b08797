"""OUTPUT of ``modal-llm batch``: one record per result, appended as JSONL, and the ids a
rerun skips (those OUTPUT already holds a ``"text"`` for). Parquet OUTPUT goes through a
JSONL journal (``parquet.py``)."""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from .._batch import BatchResult
from .._exceptions import StatusError
from .batch_input import id_key, os_problem
from .common import EXIT_USAGE, CliExit, error_text, silence_stdout

__all__ = ["JsonlSink", "completed_ids", "record"]


def completed_ids(path: str, done: set[str] | None = None) -> tuple[set[str], bool]:
    """Ids that a JSONL OUTPUT already holds a successful result for (added to ``done``), and
    whether it lacks a final newline (a line cut short by a crash: it is ignored and the next
    record starts afresh)."""
    done = set() if done is None else done
    if os.path.exists(path) and not os.path.isfile(path):
        return done, False  # a device or a pipe (/dev/stdout, /dev/null): nothing to resume
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return done, False
    except OSError as exc:
        raise CliExit(
            EXIT_USAGE, f"cannot read OUTPUT {path} to resume from it: {os_problem(exc)}"
        ) from None
    last = b"\n"
    with handle:
        try:
            for raw in handle:
                last = raw
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(parsed, dict) and "id" in parsed and "text" in parsed:
                    done.add(id_key(parsed["id"]))
        except OSError as exc:
            raise CliExit(
                EXIT_USAGE, f"cannot read OUTPUT {path} to resume from it: {os_problem(exc)}"
            ) from None
    return done, not last.endswith(b"\n")


def record(result: BatchResult) -> dict[str, Any]:
    """The OUTPUT record of one result (docs/cli.md, "Output")."""
    out: dict[str, Any] = {"id": result.id}
    if result.error is None:
        out["text"] = result.text
    else:
        error: dict[str, Any] = {
            "type": type(result.error).__name__,
            "message": error_text(result.error),
        }
        if isinstance(result.error, StatusError):
            error["status"] = result.error.status_code
        out["error"] = error
    out["attempts"] = result.attempts
    out["latency"] = round(result.latency, 4)
    return out


class JsonlSink:
    """OUTPUT as JSONL (``-``: stdout), appended and flushed one record at a time.

    A failed write (disk full, a closed pipe) raises ``CliExit``; what was written before it
    stays, whole lines only up to a last line that a rerun ignores.
    """

    def __init__(self, path: str, *, label: str = "OUTPUT") -> None:
        self.path = path
        self.name = "stdout" if path == "-" else path
        self.label = label
        self.written = 0
        self._handle: IO[str] | None = None
        self.broken = False

    def open(self) -> None:
        """Open for appending; a last line without its newline (a crash) is ended first."""
        if self.path == "-":
            self._handle = sys.stdout
            return
        needs_newline = _ends_open(self.path)
        try:
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise CliExit(
                EXIT_USAGE, f"cannot write {self.label} {self.path}: {os_problem(exc)}"
            ) from None
        if needs_newline:
            self._write("\n")

    def write(self, data: dict[str, Any]) -> None:
        """Append one record and flush it."""
        self._write(json.dumps(data, ensure_ascii=False) + "\n")
        self.written += 1

    def _write(self, text: str) -> None:
        assert self._handle is not None
        try:
            self._handle.write(text)
            self._handle.flush()
        except OSError as exc:
            self.broken = True
            if self._handle is sys.stdout:
                silence_stdout()
            raise CliExit(
                EXIT_USAGE, f"cannot write results to {self.name}: {os_problem(exc)}"
            ) from None

    def close(self) -> None:
        """Close (never stdout); after a failed write the unwritten rest is dropped."""
        handle, self._handle = self._handle, None
        if handle is None or handle is sys.stdout:
            return
        try:
            handle.close()
        except OSError as exc:
            if not self.broken:
                raise CliExit(
                    EXIT_USAGE, f"cannot write results to {self.name}: {os_problem(exc)}"
                ) from None


def _ends_open(path: str) -> bool:
    """Whether the file at ``path`` exists, is not empty and lacks a final newline."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except OSError:
        return False
