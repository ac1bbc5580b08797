"""Parquet INPUT and OUTPUT for ``modal-llm batch``, through pyarrow (the ``parquet`` extra).

pyarrow is imported only when a path ends in ``.parquet``. A Parquet file cannot be
appended to, and one cut short by a crash has no footer and cannot be read, so results go
first to a JSONL journal next to OUTPUT (``OUTPUT.partial.jsonl``, flushed per record as
JSONL output is); when the run ends (also by Ctrl-C, SIGTERM or an abort) the rows of the
old OUTPUT and of the journal are written to a new file that replaces OUTPUT, and the
journal is removed. A crash leaves the journal, which the rerun reads and merges.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any, Final

from .batch_input import IdCheck, id_key, os_problem
from .batch_output import JsonlSink, completed_ids
from .common import EXIT_USAGE, CliExit, one_line

__all__ = ["JOURNAL_SUFFIX", "ParquetSink", "parquet_rows", "require_pyarrow", "scan_parquet"]

JOURNAL_SUFFIX: Final = ".partial.jsonl"
_ROWS_PER_GROUP: Final = 10_000
_BATCH_ROWS: Final = 1024


def require_pyarrow(path: str) -> Any:
    """``pyarrow.parquet``, or ``CliExit`` naming what to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CliExit(
            EXIT_USAGE,
            f"{path}: Parquet needs pyarrow, which is not installed: pip install pyarrow "
            "(or install modal-llm with the 'parquet' extra)",
        ) from None
    return pq


def _open(path: str, label: str) -> Any:
    pq = require_pyarrow(path)
    try:
        return pq.ParquetFile(path)
    except OSError as exc:
        raise CliExit(EXIT_USAGE, f"cannot read {label} {path}: {os_problem(exc)}") from None
    except Exception as exc:  # pyarrow.ArrowInvalid: not a Parquet file
        raise CliExit(
            EXIT_USAGE, f"cannot read {label} {path} as Parquet: {one_line(exc)}"
        ) from None


def scan_parquet(path: str, check: IdCheck) -> int:
    """Read INPUT's ``id`` column once into ``check``; return the row count."""
    parquet = _open(path, "INPUT")
    names = parquet.schema_arrow.names
    if "prompt" not in names:
        raise CliExit(EXIT_USAGE, f"INPUT {path} has no 'prompt' column (it has: {names})")
    rows: int = parquet.metadata.num_rows
    if "id" not in names:
        if check.one_kind:
            check.see(1, 1)  # row numbers: integers
        return rows
    where = 0
    for batch in parquet.iter_batches(batch_size=64 * _BATCH_ROWS, columns=["id"]):
        for ident in batch.column(0).to_pylist():
            where += 1
            check.see(where if ident is None else ident, where)
    return rows


def parquet_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row number, columns)`` for every row of INPUT, read a batch at a time."""
    parquet = _open(path, "INPUT")
    where = 0
    try:
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
            for row in batch.to_pylist():
                where += 1
                yield where, row
    except OSError as exc:
        raise CliExit(
            EXIT_USAGE, f"cannot read INPUT {path} after row {where}: {os_problem(exc)}"
        ) from None


def _schema(kind: str) -> Any:
    import pyarrow as pa

    error = pa.struct([("type", pa.string()), ("message", pa.string()), ("status", pa.int32())])
    return pa.schema(
        [
            ("id", pa.int64() if kind == "int" else pa.string()),
            ("text", pa.string()),
            ("error", error),
            ("attempts", pa.int32()),
            ("latency", pa.float64()),
        ]
    )


class ParquetSink:
    """Parquet OUTPUT: the same columns as JSONL (``id``, ``text``, ``error`` as a struct of
    ``type``/``message``/``status``, ``attempts``, ``latency``), one row per id (a rerun's
    row replaces the old one), ``id`` int64 or string."""

    def __init__(self, path: str) -> None:
        require_pyarrow(path)
        self.path = path
        self.name = path
        self.journal_path = path + JOURNAL_SUFFIX
        self.journal = JsonlSink(self.journal_path, label="the journal of")
        self.kind: str | None = None

    @property
    def written(self) -> int:
        return self.journal.written

    def completed(self, done: set[str]) -> set[str]:
        """Add to ``done`` the ids OUTPUT and a leftover journal hold a text for; note the
        kind of id OUTPUT holds (``self.kind``)."""
        if os.path.exists(self.path):
            parquet = _open(self.path, "OUTPUT")
            schema = parquet.schema_arrow
            if "id" not in schema.names or "text" not in schema.names:
                raise CliExit(
                    EXIT_USAGE,
                    f"OUTPUT {self.path} is a Parquet file without 'id' and 'text' columns, "
                    "not the results of a batch: write them to another file",
                )
            import pyarrow as pa

            self.kind = "int" if pa.types.is_integer(schema.field("id").type) else "str"
            for batch in parquet.iter_batches(columns=["id", "text"]):
                ids, texts = (column.to_pylist() for column in batch.columns)
                done.update(id_key(i) for i, t in zip(ids, texts, strict=True) if t is not None)
        completed_ids(self.journal_path, done)
        if self.kind is None:
            first = next(self._journal(), None)
            if first is not None:
                self.kind = "int" if isinstance(first["id"], int) else "str"
        return done

    def open(self) -> None:
        self.journal.open()

    def write(self, data: dict[str, Any]) -> None:
        self.journal.write(data)

    def _journal(self) -> Iterator[dict[str, Any]]:
        try:
            handle = open(self.journal_path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return
        with handle:
            for raw in handle:
                try:
                    data = json.loads(raw)
                except ValueError:
                    continue  # a line cut short by a crash
                if isinstance(data, dict) and isinstance(data.get("id"), (int, str)):
                    yield data

    def close(self, kind_hint: str | None = None) -> None:
        """Close the journal and write OUTPUT from the old rows and the journal's."""
        broken = self.journal.broken
        self.journal.close()
        if not os.path.exists(self.journal_path):
            return
        try:
            self._merge(self.kind or kind_hint or "str")
        except Exception as exc:  # OSError, or pyarrow's errors: the journal is kept
            if broken:
                return  # the write error that ended the run was reported
            problem = os_problem(exc) if isinstance(exc, OSError) else one_line(exc)
            raise CliExit(
                EXIT_USAGE,
                f"cannot write OUTPUT {self.path}: {problem}; the results are kept in "
                f"{self.journal_path}: rerun the same command to finish",
            ) from None

    def _merge(self, kind: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        last: dict[str, int] = {}
        for index, data in enumerate(self._journal()):
            last[id_key(data["id"])] = index
        schema = _schema(kind)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                if os.path.exists(self.path):
                    for batch in pq.ParquetFile(self.path).iter_batches(batch_size=_ROWS_PER_GROUP):
                        ids = batch.column(batch.schema.get_field_index("id")).to_pylist()
                        keep = pa.array([id_key(i) not in last for i in ids])
                        table = pa.Table.from_batches([batch]).filter(keep)
                        writer.write_table(table.select(schema.names).cast(schema))
                rows: list[dict[str, Any]] = []
                for index, data in enumerate(self._journal()):
                    if last.get(id_key(data["id"])) != index:
                        continue  # an older result for this id: the later one wins
                    rows.append(data)
                    if len(rows) >= _ROWS_PER_GROUP:
                        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                        rows.clear()
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        os.remove(self.journal_path)
