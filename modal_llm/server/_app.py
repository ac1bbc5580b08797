"""The aiohttp application: one handler that records each request and dispatches it to the
contract checks, the fault switches, the 303 emulation or a stream; and :func:`serve`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from ._config import RESULT_QUERY, ServerConfig
from ._contract import (
    check_credentials,
    detail_reply,
    lax_bool,
    split_pieces,
    toy_generate,
    validate_body,
)
from ._faults import Faults
from ._results import Results
from ._script import Script, ScriptEntry, play
from ._stats import RecordedRequest, ServerStats
from ._streaming import stream

STATS = web.AppKey("modal_llm_server_stats", ServerStats)
CONFIG = web.AppKey("modal_llm_server_config", ServerConfig)


class Endpoint:
    """The request handler and its state; one per application, at ``app[ENDPOINT]``.

    Tests drive it through :mod:`modal_llm.testing`: :meth:`configure` swaps the switches
    mid-run, ``script`` plays exact replies, ``requests`` (when recording) lists every
    request received.
    """

    def __init__(
        self, config: ServerConfig, stats: ServerStats, *, record_requests: bool = False
    ) -> None:
        self.config = config
        """The switches in force; replace them with :meth:`configure`."""
        self.stats = stats
        self.script = Script()
        """Scripted replies still to play, one per POST (see ``_script``)."""
        self.requests: list[RecordedRequest] | None = [] if record_requests else None
        """Every request received, in arrival order (None unless recording)."""
        self._background: set[asyncio.Task[Any]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._faults = Faults(config, stats, self._spawn)
        self._results = Results(stats, self._faults, self._spawn)

    def configure(self, config: ServerConfig) -> None:
        """Use ``config`` from the next request on.

        The fault numbering starts over (``error_burst``, ``rate_limit_every`` and
        ``poll_error_every`` count from here, ``seed`` draws afresh) and a ``cold_start``
        above 0 makes the next POST cold; stats, recorded requests, the script and calls in
        flight carry on.
        """
        self.config = config
        self._faults = Faults(config, self.stats, self._spawn)
        self._results.faults = self._faults

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request; the aiohttp handler for every path and method."""
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        headers = request.headers.copy()
        stats.last_headers = headers
        stats.recent_headers.append(headers)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        stats.notify()
        try:
            raw = b""
            if request.method == "POST":
                stats.posts += 1
                raw = await request.read()
            elif request.method == "GET":
                stats.gets += 1
            # No await between these: the recorded order is the order scripts are consumed.
            entry = self.script.take() if request.method == "POST" else None
            record = self._record(request, headers, raw, entry)
            if entry is not None:
                resp = await play(entry, request, raw, self.config, stats, self._disconnected)
            else:
                resp = await self._dispatch(request, raw)
            if resp is None:  # reset with no reply
                return web.Response()
            if not resp.prepared:  # streams count their status when they start
                stats.count_status(resp.status)
            if record is not None:
                record.status = resp.status
            return resp
        except web.HTTPException as exc:
            stats.count_status(exc.status)
            raise
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away (handler_cancellation).
            self._disconnected()
            raise
        finally:
            if task is not None:
                self._handlers.discard(task)
            stats.in_flight -= 1
            self._faults.last_done = time.monotonic()
            stats.notify()

    def _record(
        self, request: web.Request, headers: CIMultiDict[str], raw: bytes, entry: ScriptEntry | None
    ) -> RecordedRequest | None:
        body: Any = None
        if request.method == "POST":
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                body = raw
            self.stats.bodies.append(body)
        if self.requests is None:
            return None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=headers,
            body=body,
            time=time.monotonic(),
            scripted=entry,
        )
        self.requests.append(record)
        return record

    def _disconnected(self) -> None:
        if not self._closing:
            self.stats.disconnects += 1

    async def _dispatch(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        config = self.config
        method = request.method
        if config.modal_key is not None and config.modal_secret is not None:
            denied = check_credentials(request, config.modal_key, config.modal_secret)
            if denied is not None:
                return denied

        call_id = request.query.get(RESULT_QUERY)
        if method == "GET" and call_id is not None:
            return await self._results.poll(request, config, call_id)
        if method != "POST":
            return detail_reply(405, "Method Not Allowed", {"Allow": "POST"})

        fault = self._faults.post_fault(config)
        if fault is not None:
            return fault
        if self._faults.needs_warm_up(config):
            await self._faults.warm_up(config)

        body, invalid = validate_body(raw, request.headers.get("Content-Type"), config.stream_flag)
        if invalid is not None:
            return invalid
        assert body is not None
        if config.latency > 0:
            await asyncio.sleep(config.latency)

        prompt: str = body["prompt"]
        stream_format = body.get("format", config.stream_format)
        if lax_bool(body.get(config.stream_flag, False)) and stream_format != "json":
            text = toy_generate(prompt, echo_prompt=config.echo_prompt)
            pieces = split_pieces(text, config.pieces)
            return await stream(
                request, config, self.stats, pieces, stream_format, self._disconnected
            )
        return await self._results.complete(request, config, prompt)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def on_shutdown(self, app: web.Application) -> None:
        """Stop everything still running so that cleanup is prompt and leaves no tasks."""
        self._closing = True
        current = asyncio.current_task()
        for task in list(self._handlers):
            if task is not current:
                task.cancel()
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._results.clear()


ENDPOINT = web.AppKey("modal_llm_server_endpoint", Endpoint)


def create_app(
    config: ServerConfig | None = None, *, record_requests: bool = False
) -> web.Application:
    """Build the endpoint application; its stats are at ``app[STATS]``.

    ``app[ENDPOINT]`` is its :class:`Endpoint`; with ``record_requests`` it keeps every
    request in ``app[ENDPOINT].requests`` (memory grows with the run: for tests).
    ``app[CONFIG]`` is the config it was built with. Run it with :func:`serve` or
    ``aiohttp.test_utils.TestServer(app)``. Both turn on aiohttp's handler cancellation;
    without it, a client that leaves while the server waits is only noticed (and counted in
    ``disconnects``) at the next write.
    """
    config = config if config is not None else ServerConfig()
    stats = ServerStats()
    endpoint = Endpoint(config, stats, record_requests=record_requests)
    app = web.Application()
    app[CONFIG] = config
    app[STATS] = stats
    app[ENDPOINT] = endpoint
    # Modal URLs have a path of their own: answer on every path.
    app.router.add_route("*", "/{tail:.*}", endpoint.handle)
    app.on_shutdown.append(endpoint.on_shutdown)
    return app


def _base_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


@contextlib.asynccontextmanager
async def serve(
    config: ServerConfig | web.Application | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[str]:
    """Run the endpoint (from a config, or an app from :func:`create_app`); yield its base URL.

    Usage::

        async with serve(ServerConfig(pieces=4)) as url:  # "http://127.0.0.1:PORT/"
            ...
    """
    app = config if isinstance(config, web.Application) else create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        # A deep backlog: benchmarks open hundreds of connections at once.
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        yield _base_url(host, runner.addresses[0][1])
    finally:
        # Stop accepting first, then let the loop finish any accept already under way so
        # that cleanup sees (and closes) its connection instead of leaking the socket.
        for running in list(runner.sites):
            await running.stop()
        # asyncio finishes an accept in a task of its own, a few loop turns later.
        await asyncio.sleep(0.01)
        await runner.cleanup()
