"""``modal-llm batch --ray [ADDRESS]``: the same batch through ``modal_llm.ray`` on Ray Data.

INPUT is read and checked by the driver exactly as without ``--ray`` (ids, resume, bad
lines); the rows go to Ray as one dataset, each actor's client sends them, and the results
come back to the driver, which writes them through the same OUTPUT sink, in the same
columns, with the same counts and exit status. ``--concurrency`` stays the number of
requests in flight in all: it is split over ``--ray-actors`` actors.

Credentials the command line resolved (``--modal-key``/``--modal-secret`` or the
environment) reach the actors through their environment: a local Ray started here
inherits this process's environment; an existing cluster (ADDRESS) gets them through the
job's ``runtime_env`` (see docs/ray.md, "Credentials", for what Ray records of it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final

from .._auth import url_has_credentials
from .._batch import BatchItem
from .._client import AsyncClient
from .._config import ENV_ENDPOINT_URL, ENV_KEY, ENV_SECRET
from .._progress import Progress
from .._run import run
from .batch_input import BatchInput
from .common import AUTH_HINT, EXIT_AUTH, EXIT_USAGE, CliExit

__all__ = ["LOCAL", "run_on_ray"]

LOCAL: Final = "local"
"""``--ray`` without an ADDRESS: start a Ray on this machine (or use the one running here)."""

_STATUS_ERRORS: Final = frozenset(
    {"StatusError", "AuthenticationError", "RateLimitError", "ServerError"}
)


async def _collect(source: BatchInput) -> list[BatchItem]:
    return [item async for item in source.items()]


def _start_ray(address: str, env: dict[str, str]) -> dict[str, Any] | None:
    """Connect to (or start) Ray; return the ``runtime_env`` the actors need, if any."""
    import ray

    if not ray.is_initialized():
        if address == LOCAL:
            # Workers of a Ray started here inherit this environment: nothing to record.
            os.environ.update(env)
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            return None
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return {"env_vars": env} if env else None


def run_on_ray(
    args: argparse.Namespace,
    client: AsyncClient,
    source: BatchInput,
    sink: Any,
    progress: Progress,
    state: Any,
    *,
    run: Callable[[Coroutine[Any, Any, list[BatchItem]]], list[BatchItem]] = run,
) -> None:
    """Send every item of ``source`` through ``modal_llm.ray``; write and count as ``batch``.

    ``run`` runs the coroutine that reads INPUT (``batch`` passes its ``Interrupts.run``, so
    SIGTERM there is handled as everywhere else).
    """
    try:
        import modal_llm.ray as mray
    except ImportError:
        raise CliExit(
            EXIT_USAGE, "--ray needs Ray Data: pip install 'ray[data]>=2.60' (the 'ray' extra)"
        ) from None
    import ray.data

    items = run(_collect(source))
    if not items:
        return
    options = client.options
    env = {}
    if options.modal_key is not None and options.modal_secret is not None:
        env = {ENV_KEY: options.modal_key, ENV_SECRET: options.modal_secret}
    url: str | None = options.endpoint_url
    if url_has_credentials(options.endpoint_url):  # never a pickled argument: an env var
        env[ENV_ENDPOINT_URL], url = options.endpoint_url, None
    runtime_env = _start_ray(args.ray, env)
    actors = args.ray_actors
    rows = [
        {
            "_row": i,
            "prompt": item.prompt,
            "_args": json.dumps(dict(item.extra), ensure_ascii=False) if item.extra else None,
        }
        for i, item in enumerate(items)
    ]
    if args.ordered:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    out = mray.generate(
        ray.data.from_items(rows),
        url,
        extra_column="_args",
        stop=args.stop,
        rate_limit=None if args.rate is None else args.rate / actors,
        adaptive=args.adaptive,
        actors=actors,
        runtime_env=runtime_env,
        max_concurrency=max(1, -(-args.concurrency // actors)),
        timeout=options.timeout,
        retry=options.retry,
    )
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        table: Any = batch
        for row in table.to_pylist():
            record: dict[str, Any] = {"id": items[row["_row"]].id}
            failed = row["error"] is not None
            if failed:
                error: dict[str, Any] = {"type": row["error_type"], "message": row["error"]}
                if row["error_type"] in _STATUS_ERRORS and row["status"] is not None:
                    error["status"] = row["status"]
                record["error"] = error
            else:
                record["text"] = row["text"]
            record["attempts"] = row["attempts"]
            record["latency"] = round(row["latency_s"], 4)
            sink.write(record)
            progress.advance(failed=failed)
            state.retries += max(0, row["attempts"] - 1)
            if not failed:
                state.ok += 1
                continue
            state.failed += 1
            if row["error_type"] == "AuthenticationError":
                # Every other row would fail the same way (as without --ray).
                raise CliExit(EXIT_AUTH, f"authentication failed: {row['error']}; {AUTH_HINT}")
