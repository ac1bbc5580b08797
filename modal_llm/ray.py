"""Fan a batch out past one machine on Ray Data (the ``ray`` extra: ``ray[data]>=2.60``).

Usage::

    import ray
    import modal_llm.ray

    ds = ray.data.read_parquet("/shared/prompts/")          # a "prompt" column, any others
    out = modal_llm.ray.generate(ds, "https://me--llm-web.modal.run", actors=4)
    out.write_parquet("/shared/results/")                    # input columns + result columns

Every row gets the result columns of :data:`RESULT_SCHEMA`: ``text`` (null on failure),
``error``, ``error_type`` (the ``ModalLLMError`` class name), ``status``, ``attempts`` and
``latency_s``. Each Ray actor holds one pooled ``AsyncClient``, opened on the actor's event
loop and closed when the actor shuts down; retries, ``Retry-After``, pacing and parsing are
the client's (``AsyncClient.map``), never Ray's task retries. Credentials come only from the
actors' environment (``MODAL_LLM_KEY``/``MODAL_LLM_SECRET``, through ``runtime_env``).
See docs/ray.md.

``import modal_llm`` never loads this module (nor Ray, nor pyarrow).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa

from . import (
    AsyncClient,
    BatchItem,
    ClientClosedError,
    ConfigError,
    ModalLLMError,
)
from ._auth import is_credential_header, url_has_credentials
from ._config import ENV_ENDPOINT_URL
from ._exceptions import redact_url
from ._fanout import FanOutPlan
from ._lazy import LazyModule
from ._raycolumns import (
    RESULT_COLUMNS,
    RESULT_SCHEMA,
    Columns,
    as_table,
    check_model_kwargs,
    row_extra,
)
from ._stop import normalize_stop
from ._types import StopTypes

if TYPE_CHECKING:
    import ray.data as ray_data
else:  # Ray loads on first use (typing.get_type_hints resolves ray_data then: _lazy.py)
    ray_data = LazyModule("ray.data", optional=True)

__all__ = [
    "DEFAULT_ACTORS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CALLS_PER_ACTOR",
    "DEFAULT_NUM_CPUS",
    "RESULT_COLUMNS",
    "RESULT_SCHEMA",
    "Generator",
    "generate",
]

log = logging.getLogger("modal_llm.ray")

DEFAULT_ACTORS: Final = 2
"""Actors (each one process with one pooled client) when ``actors`` is not given."""
DEFAULT_CALLS_PER_ACTOR: Final = 16
"""Blocks an actor works on at once. Ray's default is one, and a block then waits for its
slowest row (a retry after a 429 or a 5xx) while the actor's other connections sit idle."""
DEFAULT_BATCH_SIZE: Final = 64
"""Rows per batch handed to an actor; also the block size an input is spread into."""
DEFAULT_NUM_CPUS: Final = 0.5
"""CPUs Ray reserves per actor. The work is waiting on HTTP, so less than a core each;
a whole core per actor would starve Ray's own read and write tasks on a small machine."""
CLOSE_TIMEOUT: Final = 10.0
"""Seconds an actor waits for its client to close at shutdown."""

_CREDENTIAL_OPTIONS: Final = frozenset({"modal_key", "modal_secret"})
_CREDENTIALS_HINT: Final = (
    "credentials are read from the actors' environment (MODAL_LLM_KEY and MODAL_LLM_SECRET, "
    "e.g. runtime_env={'env_vars': {...}}), never passed as arguments, which Ray pickles"
)


def _check_client_options(options: Mapping[str, Any]) -> None:
    """Refuse credentials in arguments that Ray would pickle and ship to every actor."""
    given = sorted(_CREDENTIAL_OPTIONS & set(options))
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be passed here: {_CREDENTIALS_HINT}")
    headers = options.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ConfigError(f"headers must be a mapping, not {type(headers).__name__}")
    named = sorted(str(name) for name in headers if is_credential_header(str(name)))
    if named:
        names = ", ".join(named)
        raise ConfigError(f"header(s) {names} cannot be passed here: {_CREDENTIALS_HINT}")


def _check_map_options(stop: StopTypes, rate_limit: object, adaptive: object) -> None:
    """``AsyncClient.map``'s own checks of the options ``Generator`` passes it, run where
    the job is built: otherwise a bad one fails the job at every actor's first block.
    The client's ``max_concurrency`` is the actors' to check: no cap is applied here."""
    normalize_stop(stop)
    FanOutPlan.build(
        cap=sys.maxsize,
        ordered=False,
        concurrency=None,
        window=None,
        rate_limit=rate_limit,  # type: ignore[arg-type]  # checked by build
        adaptive=adaptive,  # type: ignore[arg-type]
        progress=False,
        on_progress=None,
        total=None,
    )


def _check_url(endpoint_url: object) -> None:
    """Refuse an ``endpoint_url`` argument that carries a credential (userinfo or query
    values): Ray pickles it to every actor."""
    if isinstance(endpoint_url, str) and url_has_credentials(endpoint_url):
        raise ConfigError(
            f"endpoint_url {redact_url(endpoint_url)!r} carries credentials (userinfo or query "
            "values) and cannot be passed here: set MODAL_LLM_ENDPOINT_URL in the actors' "
            "environment (e.g. runtime_env={'env_vars': {...}}) and leave endpoint_url None"
        )


class Generator:
    """A callable class for ``Dataset.map_batches``: one pooled client per Ray actor.

    ``generate`` is built on it; use it directly to compose your own pipeline::

        from ray.data import ActorPoolStrategy
        from modal_llm.ray import Generator

        out = ds.map_batches(
            Generator,
            fn_constructor_kwargs={"endpoint_url": url, "model_kwargs": {"max_tokens": 64}},
            batch_size=64,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=4, max_concurrent_calls_per_actor=16),
            num_cpus=0.5,
        )

    A batch (pyarrow, pandas or a dict of arrays) comes back as a ``pyarrow.Table``: its
    columns (minus any named like a result column, which are replaced) then
    :data:`RESULT_SCHEMA`'s. Each row's prompt is ``prompt_column``; its model arguments
    are ``model_kwargs`` overridden by ``extra_column`` (a struct, map or JSON-object
    column; null fields of a struct are left out). ``stop``, ``rate_limit`` (requests per
    second, per actor) and ``adaptive`` (AIMD back-off on 429/503, per actor) are those of
    ``AsyncClient.map``. ``client_options`` are ``AsyncClient`` options, applied per actor
    (``max_concurrency`` is requests in flight per actor, shared by all its blocks).
    ``make_client_options`` is a picklable zero-argument callable run once in each actor
    that returns more client options: for objects that must be built where they are used
    (tracer or meter providers, hooks) rather than pickled.

    Errors: a row whose request fails with a ``ModalLLMError`` (or whose prompt is null
    or whose extra arguments are malformed: ``ConfigError``) gets the error columns and
    the batch goes on; with ``raise_on_error=True`` the first such row's error is raised
    and fails the job. A missing or non-string prompt column raises ``ConfigError``; any
    other exception (a bug) propagates. ``modal_key``/``modal_secret`` or credential
    headers raise ``ConfigError``: credentials come from the actor's environment
    (``MODAL_LLM_KEY``/``MODAL_LLM_SECRET``), as does the URL when ``endpoint_url`` is None.

    The client opens on the first batch, on the event loop Ray runs async callables on,
    and closes when Ray shuts the actor down (``__del__``) or on ``close()``.
    """

    def __init__(
        self,
        endpoint_url: str | None = None,
        *,
        prompt_column: str = "prompt",
        extra_column: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        stop: StopTypes = None,
        rate_limit: float | None = None,
        adaptive: bool = False,
        raise_on_error: bool = False,
        client_options: Mapping[str, Any] | None = None,
        make_client_options: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        _check_url(endpoint_url)
        options = dict(client_options or {})
        _check_client_options(options)
        if make_client_options is not None:
            built = dict(make_client_options())
            _check_client_options(built)
            options.update(built)
        if not isinstance(prompt_column, str) or not prompt_column:
            raise ConfigError(f"prompt_column must be a column name, not {prompt_column!r}")
        if extra_column is not None and (not isinstance(extra_column, str) or not extra_column):
            raise ConfigError(f"extra_column must be a column name or None, not {extra_column!r}")
        _check_map_options(stop, rate_limit, adaptive)
        self.prompt_column = prompt_column
        self.extra_column = extra_column
        self.model_kwargs = check_model_kwargs(model_kwargs)
        self.stop = stop
        self.rate_limit = rate_limit
        self.adaptive = adaptive
        self.raise_on_error = raise_on_error
        # Credentials and (when endpoint_url is None) the URL come from this process's
        # environment here, in the actor: nothing secret was pickled to get us here.
        self._client = AsyncClient(endpoint_url, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.rows = 0
        """Rows this instance has answered (successes and failures)."""
        self.failed = 0
        """Rows that got an error."""

    def __repr__(self) -> str:
        return (
            f"Generator({redact_url(self._client.endpoint_url)!r}, "
            f"prompt_column={self.prompt_column!r}, "
            f"max_concurrency={self._client.options.max_concurrency})"
        )

    @property
    def client(self) -> AsyncClient:
        """This actor's client (open once a batch has run on its event loop)."""
        return self._client

    async def __call__(self, batch: object) -> pa.Table:
        """Generate for every row of ``batch``; return it with the result columns."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise ClientClosedError(
                "a Generator serves one event loop (Ray runs async callables on one loop "
                "per actor); create one Generator per loop"
            )
        table = as_table(batch)
        prompts = self._prompts(table)
        columns = Columns(table.num_rows)
        items: list[BatchItem] = []
        extras = self._extras(table)
        for row, prompt in enumerate(prompts):
            try:
                if prompt is None:
                    raise ConfigError(f"{self.prompt_column!r} is null")
                extra = self.model_kwargs
                if extras is not None and extras[row] is not None:
                    extra = {**extra, **row_extra(extras[row], self.extra_column or "")}
            except ConfigError as exc:
                self._failed_row(columns, row, exc)
                continue
            items.append(BatchItem(prompt, id=row, extra=extra))
        if items:
            await self._send(items, columns)
        self.rows += table.num_rows
        return columns.append_to(table)

    def _prompts(self, table: pa.Table) -> list[str | None]:
        name = self.prompt_column
        if name not in table.column_names:
            raise ConfigError(
                f"no prompt column {name!r} in the batch (columns: "
                f"{', '.join(table.column_names) or 'none'}); pass prompt_column"
            )
        column = table.column(name)
        kind = column.type
        types = pa.types
        if not (types.is_string(kind) or types.is_large_string(kind) or types.is_null(kind)):
            raise ConfigError(f"prompt column {name!r} must hold strings, not {kind}")
        prompts: list[str | None] = column.to_pylist()
        return prompts

    def _extras(self, table: pa.Table) -> list[object] | None:
        name = self.extra_column
        if name is None:
            return None
        if name not in table.column_names:
            raise ConfigError(f"no extra column {name!r} in the batch; pass extra_column")
        values: list[object] = table.column(name).to_pylist()
        return values

    def _failed_row(self, columns: Columns, row: int, error: ModalLLMError) -> None:
        if self.raise_on_error:
            raise error
        self.failed += 1
        columns.fail(row, error, 0, 0.0)

    async def _send(self, items: list[BatchItem], columns: Columns) -> None:
        # An item's id is its row in the batch (its index is its place in ``items``).
        results = self._client.map(
            items,
            stop=self.stop,
            rate_limit=self.rate_limit,
            adaptive=self.adaptive,
        )
        async with contextlib.aclosing(results):
            async for result in results:
                row = result.id
                assert isinstance(row, int)
                if result.error is not None:
                    if self.raise_on_error:
                        raise result.error
                    self.failed += 1
                columns.put(row, result)

    async def aclose(self) -> None:
        """Close the client (on the loop it was opened on). Idempotent."""
        await self._client.aclose()

    def close(self) -> None:
        """Close the client from any thread; never raises. ``__del__`` calls it."""
        client = getattr(self, "_client", None)
        loop = getattr(self, "_loop", None)
        if client is None or loop is None or loop.is_closed():
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if (
                running is not None and running is loop
            ):  # on the client's own loop: we cannot block on it
                task = loop.create_task(client.aclose())
                _CLOSING.add(task)
                task.add_done_callback(_CLOSING.discard)
            elif loop.is_running():
                future = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
                try:
                    future.result(CLOSE_TIMEOUT)
                except BaseException:
                    future.cancel()
                    raise
            else:
                loop.run_until_complete(client.aclose())
        except Exception as exc:  # shutdown must go on; say why the pool may leak
            log.warning("could not close the client: %s", type(exc).__name__)
            return
        log.debug(
            "closed the client for %s after %d rows (%d failed)",
            redact_url(client.endpoint_url),
            self.rows,
            self.failed,
        )

    def __del__(self) -> None:
        # Ray Data drops the actor's callable when the actor shuts down gracefully; this is
        # where the pooled connections get closed, on the loop that opened them.
        self.close()


_CLOSING: set[asyncio.Task[None]] = set()  # strong references to closes scheduled on a loop


def _compute(actors: int | tuple[int, int], calls_per_actor: int) -> Any:
    from ray.data import ActorPoolStrategy

    def count(name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, not {value!r}")
        return value

    calls = count("calls_per_actor", calls_per_actor)
    if isinstance(actors, tuple):
        if len(actors) != 2:
            raise ConfigError(f"actors must be an int or a (min, max) pair, not {actors!r}")
        low, high = count("actors minimum", actors[0]), count("actors maximum", actors[1])
        if low > high:
            raise ConfigError(f"actors minimum ({low}) must not exceed the maximum ({high})")
        return ActorPoolStrategy(min_size=low, max_size=high, max_concurrent_calls_per_actor=calls)
    return ActorPoolStrategy(size=count("actors", actors), max_concurrent_calls_per_actor=calls)


def _spread(ds: Any, batch_size: int, actors: float, calls_per_actor: int) -> Any:
    """``ds`` cut into blocks that can keep every actor busy.

    A materialized dataset (``from_items``, ``from_pandas``, ``materialize()``...) knows
    its blocks: it is repartitioned only when it has fewer than 4 × ``actors`` ×
    ``calls_per_actor`` (at most one block per ``batch_size`` rows);
    many small blocks are left alone, ``map_batches`` bundles them. A lazy dataset's
    blocks are unknown until it runs: blocks over ``batch_size`` rows are cut as they
    stream by (Ray's streaming repartition; no shuffle, nothing materialized).
    """
    from ray.data.dataset import MaterializedDataset

    if isinstance(ds, MaterializedDataset):
        rows = ds.count()  # from the blocks' metadata: nothing runs
        # Ray Data hands an actor up to twice its calls at once: twice that again per actor
        # leaves work for the actors that start last.
        wanted = min(-(-rows // batch_size), 4 * int(min(actors, 1024)) * calls_per_actor)
        if ds.num_blocks() < wanted:
            return ds.repartition(wanted)
        return ds
    return ds.repartition(target_num_rows_per_block=batch_size)


def generate(
    ds: ray_data.Dataset,
    endpoint_url: str | None = None,
    *,
    prompt_column: str = "prompt",
    extra_column: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    stop: StopTypes = None,
    raise_on_error: bool = False,
    rate_limit: float | None = None,
    adaptive: bool = False,
    actors: int | tuple[int, int] = DEFAULT_ACTORS,
    calls_per_actor: int = DEFAULT_CALLS_PER_ACTOR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_cpus: float = DEFAULT_NUM_CPUS,
    spread: bool = True,
    runtime_env: Mapping[str, Any] | None = None,
    make_client_options: Callable[[], Mapping[str, Any]] | None = None,
    ray_remote_args: Mapping[str, Any] | None = None,
    **client_options: Any,
) -> ray_data.Dataset:
    """Generate for every row of ``ds``; return a lazy Dataset with the result columns.

    The output has the input's columns (minus any named like a result column, which are
    replaced) then :data:`RESULT_SCHEMA`'s, the same Arrow schema in every block, so it
    writes and reads back as one Parquet dataset. Nothing runs until the output is
    consumed (``write_parquet``, ``iter_batches``, ``materialize``...).

    Request options: ``prompt_column`` (strings; a null prompt is a failed row),
    ``extra_column`` (per-row model arguments: a struct, map or JSON-object column) over
    ``model_kwargs`` (the same for every row), ``stop`` (cut on the client),
    ``raise_on_error`` (the first failed row fails the job; otherwise failures are rows).
    ``endpoint_url`` defaults to ``MODAL_LLM_ENDPOINT_URL`` of this process, else of the
    actors. ``client_options`` (``max_concurrency``, ``max_retries``, ``retry``,
    ``timeout``, ``headers``...) configure each actor's ``AsyncClient``; like
    ``rate_limit`` (requests/s) and ``adaptive`` (AIMD on 429/503) they apply **per
    actor**. They are pickled to the actors, so credentials are refused (``ConfigError``):
    set ``MODAL_LLM_KEY``/``MODAL_LLM_SECRET`` in ``runtime_env={"env_vars": {...}}`` or on
    the cluster. ``make_client_options`` builds unpicklable options in each actor.

    Ray options: ``actors`` (a number, or a ``(min, max)`` autoscaling range), default
    :data:`DEFAULT_ACTORS`; ``calls_per_actor``, blocks each actor works on at once
    (default :data:`DEFAULT_CALLS_PER_ACTOR`; they share the actor's client and its
    ``max_concurrency``); ``batch_size`` rows per call (default
    :data:`DEFAULT_BATCH_SIZE`); ``num_cpus`` per actor (default :data:`DEFAULT_NUM_CPUS`);
    ``spread``: cut an input of few, large blocks (a one-block input included) so that
    every actor gets work, with the least data movement (see ``_spread``); ``runtime_env`` and
    ``ray_remote_args`` for the actors. Requests in flight at most: ``actors`` ×
    ``max_concurrency`` (see docs/ray.md, "Sizing").

    Raises ``ConfigError`` at once for bad options. A row error never fails the job
    unless ``raise_on_error``; a failure that is not a ``ModalLLMError`` does. Rows are
    never re-sent by Ray task retries for an HTTP failure: retries are the client's, per
    row; Ray re-runs a block only if its actor process dies.
    """
    from ray.data import Dataset

    if not isinstance(ds, Dataset):
        raise ConfigError(f"ds must be a ray.data.Dataset, not {type(ds).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, not {batch_size!r}")
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or num_cpus < 0:
        raise ConfigError(f"num_cpus must be a number >= 0, not {num_cpus!r}")
    compute = _compute(actors, calls_per_actor)
    _check_client_options(client_options)
    _check_map_options(stop, rate_limit, adaptive)
    _check_url(endpoint_url)
    url = endpoint_url or os.environ.get(ENV_ENDPOINT_URL) or None
    checked = url
    if url is not None and url_has_credentials(url):
        url = None  # the driver's own: the actors read MODAL_LLM_ENDPOINT_URL themselves
    kwargs: dict[str, Any] = {
        "endpoint_url": url,
        "prompt_column": prompt_column,
        "extra_column": extra_column,
        "model_kwargs": check_model_kwargs(model_kwargs),
        "stop": stop,
        "rate_limit": rate_limit,
        "adaptive": adaptive,
        "raise_on_error": raise_on_error,
        "client_options": dict(client_options),
        "make_client_options": make_client_options,
    }
    if checked is not None:
        # Validate here, in the driver, rather than in every actor on the cluster. The
        # client is never opened, so it holds no connection to close.
        Generator(**{**kwargs, "make_client_options": None})
    remote_args = dict(ray_remote_args or {})
    if runtime_env is not None:
        remote_args["runtime_env"] = dict(runtime_env)
    if spread:
        ds = _spread(ds, batch_size, compute.max_size, calls_per_actor)
    return ds.map_batches(
        Generator,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=compute,
        num_cpus=num_cpus,
        udf_modifying_row_count=False,
        **remote_args,
    )
