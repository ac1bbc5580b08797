"""Rows and columns of ``modal_llm.ray``: the result schema, a Ray batch as an Arrow table,
each row's model arguments, and the result columns filled row by row (pyarrow; no Ray).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import pyarrow as pa

from . import BatchResult, ConfigError, ContractError, ModalLLMError, StatusError

__all__ = [
    "RESULT_COLUMNS",
    "RESULT_SCHEMA",
    "SUCCESS_STATUS",
    "Columns",
    "as_table",
    "check_model_kwargs",
    "row_extra",
    "status_of",
]

RESULT_SCHEMA: Final = pa.schema(
    [
        pa.field("text", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("status", pa.int32()),
        pa.field("attempts", pa.int32()),
        pa.field("latency_s", pa.float64()),
    ]
)
"""The columns every output block gets, after the input's, with exactly these Arrow types.

``text``: the generated text, null on failure. ``error``: the error's one-line message,
null on success. ``error_type``: the ``ModalLLMError`` subclass name, null on success.
``status``: the HTTP status of the reply that decided the row (200 on success, the
error's status for a ``StatusError`` or ``ContractError``), null when no reply arrived.
``attempts``: HTTP attempts of the row's POST, retries included (0 when nothing was sent).
``latency_s``: seconds from the first attempt to the outcome, backoff included.
"""
RESULT_COLUMNS: Final = tuple(RESULT_SCHEMA.names)

SUCCESS_STATUS: Final = 200
"""The status the contract's success reply carries (``status`` of a successful row)."""


def check_model_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model arguments every row gets, checked: a mapping without ``prompt``."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping):
        raise ConfigError(f"model_kwargs must be a mapping, not {type(model_kwargs).__name__}")
    if "prompt" in model_kwargs:
        raise ConfigError("model_kwargs must not contain 'prompt'; use prompt_column")
    return dict(model_kwargs)


def as_table(batch: object) -> pa.Table:
    """A Ray batch (pyarrow, pandas or a dict of numpy arrays) as a ``pyarrow.Table``."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, Mapping):
        return pa.table(dict(batch))
    if type(batch).__name__ == "DataFrame":  # pandas, without importing it here
        return pa.Table.from_pandas(batch, preserve_index=False)
    raise ConfigError(
        f"a batch must be a pyarrow Table, a pandas DataFrame or a dict of arrays, not "
        f"{type(batch).__name__} (pass batch_format='pyarrow' to map_batches)"
    )


def row_extra(value: object, column: str) -> dict[str, Any]:
    """One row's model arguments from ``extra_column``: a struct, a map or a JSON object.

    Struct fields that are null are left out (a struct cannot say "absent"). Raises
    ``ConfigError`` for a value that is not an object or carries ``"prompt"``.
    """
    if value is None:
        return {}
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"{column!r} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError(
                f"{column!r} must hold a JSON object of model arguments, not {type(value).__name__}"
            )
        extra = value
    elif isinstance(value, Mapping):
        extra = {k: v for k, v in value.items() if v is not None}
    elif isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        extra = dict(value)  # an Arrow map column reads back as (key, value) pairs
    else:
        raise ConfigError(
            f"{column!r} must be a struct, a map or a JSON object string, not "
            f"{type(value).__name__}"
        )
    if "prompt" in extra:
        raise ConfigError(f"{column!r} must not contain 'prompt'")
    return extra


def status_of(error: ModalLLMError) -> int | None:
    """The ``status`` column of a failed row: the reply's status, None if none came."""
    if isinstance(error, (StatusError, ContractError)):
        return error.status_code
    return None


class Columns:
    """The result columns of one batch, filled row by row."""

    __slots__ = ("attempts", "error", "error_type", "latency_s", "status", "text")

    def __init__(self, size: int) -> None:
        self.text: list[str | None] = [None] * size
        self.error: list[str | None] = [None] * size
        self.error_type: list[str | None] = [None] * size
        self.status: list[int | None] = [None] * size
        self.attempts: list[int] = [0] * size
        self.latency_s: list[float] = [0.0] * size

    def fail(self, row: int, error: ModalLLMError, attempts: int, latency: float) -> None:
        self.error[row] = str(error)
        self.error_type[row] = type(error).__name__
        self.status[row] = status_of(error)
        self.attempts[row] = attempts
        self.latency_s[row] = latency

    def put(self, row: int, result: BatchResult) -> None:
        if result.error is not None:
            self.fail(row, result.error, result.attempts, result.latency)
            return
        self.text[row] = result.text
        self.status[row] = SUCCESS_STATUS
        self.attempts[row] = result.attempts
        self.latency_s[row] = result.latency

    def append_to(self, table: pa.Table) -> pa.Table:
        """``table`` without any columns named like ours, then ours, typed as the schema."""
        stale = [name for name in RESULT_COLUMNS if name in table.column_names]
        if stale:
            table = table.drop_columns(stale)
        for field in RESULT_SCHEMA:
            table = table.append_column(field, pa.array(getattr(self, field.name), field.type))
        return table
