"""FaultProxy: a fault-injecting TCP proxy (refuse, reset, stall, cut, delay) for reliability tests.

``FaultProxy`` listens on 127.0.0.1 (a free port) and forwards raw TCP to an upstream (the
reference endpoint, or any ``aiohttp.test_utils.TestServer``). Each HTTP exchange that passes
through gets one fault kind, which imitates a failure seen in production:

``refuse``
    Accept the connection, then close it without reading the request. The client sees the
    connection close before any response byte; the upstream never sees the request.
    Imitates a listener with nothing behind it (a worker crashing at start-up, a load balancer
    with no healthy backend) and, on a reused keep-alive connection, the race where the server
    closes an idle pooled connection just as the client sends on it.
``reset``
    Read the whole request, then close with a TCP RST (``SO_LINGER`` 0) without forwarding it.
    The client gets ``ECONNRESET``; the upstream never sees the request, so a retry is safe.
    Imitates a container that is OOM-killed or crashes, an ingress that drops its connection
    table, a middlebox that times out the flow.
``stall_before``
    Forward the request, then hold back every response byte until ``release()`` or until the
    client gives up. Imitates a cold start (Modal booting a GPU container), a request queued
    behind others, a hung model. It trips a client's first-byte timeout. The upstream *did* run
    the request, so a retry must reuse its ``Idempotency-Key``.
``stall_mid``
    Forward the response head and part of the body, then hold the rest until ``release()``.
    Imitates a generation that hangs mid-stream (a stuck GPU, a paused worker) or a path that
    silently drops packets mid-response (a NAT or VPN losing state). It trips a client's read
    timeout (the gap between chunks) after the headers have arrived.
``cut``
    Forward part of the response, then close the connection (FIN). The client sees a truncated
    body (aiohttp raises ``ClientPayloadError``). Imitates a worker crashing mid-generation,
    or a proxy or container being restarted by a deploy while it streams.
``delay``
    Sleep ``delay_seconds`` before forwarding each upstream chunk; the reply still completes.
    Imitates a slow or congested link, and exercises the code that runs while bytes trickle in.
``none``
    Clean pass-through.

Choosing faults. A fault is chosen per request, not per connection: a keep-alive connection
may carry many requests, and a soak through a pooled client would otherwise see almost no
faults (fault-free connections live long, faulty ones die). The first fault is drawn when
the connection is accepted (``refuse`` must act before reading). Each later one is drawn
when the client sends bytes after the upstream has answered, which marks a new request for
a client that does not pipeline (aiohttp does not); a ``refuse`` there drops those bytes and
closes. The next entry of ``config.schedule`` is used first and consumed; otherwise one draw
from ``random.Random(config.seed)`` (seeded once, in ``__init__``) is compared with the
cumulative rates in the order of ``FAULT_KINDS``. Scheduled entries consume no randomness.
The sequence of faults (``history``) is reproducible; which connection gets which one depends
on scheduling when clients run concurrently. Note that aiohttp retries an idempotent request
(GET, PUT, DELETE...) once by itself when a reused connection fails, which takes another draw.

Byte-level faults act on the upstream-to-client direction only. ``cut_after`` and
``stall_after`` count response bytes from the status line. The point is clamped into the body:
never before the end of the head, and always before the response's last byte (for a chunked
body, its ``0\\r\\n\\r\\n`` terminator; for a close-delimited one, its last byte). So a short
reply is still truncated, and a long head is never split. (A reply with an empty body is the
exception: its head is cut short.)

Limits: HTTP/1.x only; no pipelining; ``Expect: 100-continue``, trailers and replies to HEAD are
not modelled. A client that half-closes (EOF) ends the whole connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from types import TracebackType
from typing import TYPE_CHECKING, Final

from modal_llm.server._script import abort_with_rst

from ._faultplan import FAULT_KINDS, FaultConfig, FaultKind, Limiter, choose_fault, request_complete

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FAULT_KINDS", "FaultConfig", "FaultKind", "FaultProxy", "choose_fault"]

CHUNK_SIZE: Final = 64 * 1024

_log = logging.getLogger(__name__)


class _Link:
    """One client connection, its upstream connection, and the fault of its current request."""

    __slots__ = (
        "client_reader",
        "client_writer",
        "fault",
        "gate",
        "held",
        "limiter",
        "passthrough",
        "request_buf",
        "response_seen",
        "rst",
        "upstream_reader",
        "upstream_writer",
    )

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.client_reader = reader
        self.client_writer = writer
        self.upstream_reader: asyncio.StreamReader | None = None
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.fault: FaultKind = "none"
        self.response_seen = False  # the upstream sent bytes since the current request began
        self.passthrough = True
        self.limiter: Limiter | None = None
        self.held = bytearray()
        self.request_buf = bytearray()
        self.gate = asyncio.Event()  # set by FaultProxy.release()
        self.rst = False

    def start_request(self, fault: FaultKind, config: FaultConfig) -> None:
        self.fault = fault
        self.response_seen = False
        self.passthrough = fault == "none"
        after = {"cut": config.cut_after, "stall_mid": config.stall_after}.get(fault)
        self.limiter = None if after is None else Limiter(after)
        self.held = bytearray()
        self.request_buf = bytearray()
        self.gate = asyncio.Event()

    def writers(self) -> list[asyncio.StreamWriter]:
        if self.upstream_writer is None:
            return [self.client_writer]
        return [self.client_writer, self.upstream_writer]

    def abort(self) -> None:
        for writer in self.writers():
            writer.transport.abort()

    async def wait_closed(self) -> None:
        for writer in self.writers():
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class FaultProxy:
    """An asyncio TCP proxy on 127.0.0.1 that injects faults into the HTTP exchanges it forwards.

    Usage::

        async with FaultProxy(server.host, server.port, FaultConfig(schedule=["cut"])) as proxy:
            ...  # point the client at proxy.url
            assert proxy.counts["cut"] == 1
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, config: FaultConfig | None = None
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.config = config if config is not None else FaultConfig()
        self.port = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.history: list[FaultKind] = []  # every fault chosen, in order
        self.connections = 0
        self.errors: list[BaseException] = []  # unexpected errors in proxy tasks (bugs)
        self._rng = random.Random(self.config.seed)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stalled = 0
        self._changed = asyncio.Event()
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def open_connections(self) -> int:
        return len(self._links)

    @property
    def stalled(self) -> int:
        """Responses being held back right now (stall_before or stall_mid at their hold point)."""
        return self._stalled

    async def start(self) -> None:
        if self._server is not None or self._stopping:
            raise RuntimeError("a FaultProxy can be started only once")
        self._server = await asyncio.start_server(self._on_accept, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, close every connection, and wait until no proxy task is left."""
        self._stopping = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.abort()
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Settled here, not left to their done callbacks: those run on a later loop
            # iteration, and a gather of tasks that had all finished already need not yield
            # to the loop (Python 3.12 completes it at once), so this loop would spin.
            for task in tasks:
                self._task_done(task)
        for link in list(self._links):  # tasks cancelled before they ever ran
            link.abort()
            await link.wait_closed()
            self._forget(link)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def release(self) -> None:
        """Let every stalled response go: requests whose fault is a stall now pass through."""
        for link in self._links:
            link.gate.set()

    async def wait_idle(self) -> None:
        """Return once no connection is open."""
        await self._wait_until(lambda: not self._links)

    async def wait_stalled(self, count: int = 1) -> None:
        """Return once at least ``count`` responses are being held back."""
        await self._wait_until(lambda: self._stalled >= count)

    # -- internals ----------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def _track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A proxy task finished: forget it and keep its error, once (stop() may come first)."""
        if task not in self._tasks:
            return
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.errors.append(exc)
            _log.error("fault proxy task %s failed", task.get_name(), exc_info=exc)

    def _forget(self, link: _Link) -> None:
        if link in self._links:
            self._links.discard(link)
            self._notify()

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:
            writer.transport.abort()
            return
        link = _Link(reader, writer)
        self.connections += 1
        self._links.add(link)
        self._notify()
        loop = asyncio.get_running_loop()
        self._track(loop.create_task(self._serve(link), name=f"faultproxy-{self.connections}"))

    def _begin_request(self, link: _Link) -> None:
        fault = choose_fault(self.config, self._rng)
        self.counts[fault] += 1
        self.history.append(fault)
        link.start_request(fault, self.config)

    async def _serve(self, link: _Link) -> None:
        pumps: list[asyncio.Task[None]] = []
        try:
            self._begin_request(link)
            if link.fault == "refuse":
                return
            if link.fault != "reset":  # a reset never forwards, so it needs no upstream
                try:
                    link.upstream_reader, link.upstream_writer = await asyncio.open_connection(
                        self.upstream_host, self.upstream_port
                    )
                except OSError as exc:
                    _log.warning("fault proxy: upstream unreachable: %s", exc)
                    return
                pumps.append(self._track(asyncio.create_task(self._pump_responses(link))))
            pumps.append(self._track(asyncio.create_task(self._pump_requests(link))))
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)  # errors go to _task_done
            await self._close(link)

    async def _close(self, link: _Link) -> None:
        try:
            if link.rst:
                abort_with_rst(link.client_writer.transport)
            for writer in link.writers():
                if self._stopping:
                    writer.transport.abort()
                else:
                    writer.close()  # flushes what was written (a cut's prefix), then FIN
            await link.wait_closed()
        finally:
            self._forget(link)

    async def _stall(self, link: _Link) -> None:
        self._stalled += 1
        self._notify()
        try:
            await link.gate.wait()
        finally:
            self._stalled -= 1
            self._notify()

    async def _pump_requests(self, link: _Link) -> None:
        """Client to upstream; spots request boundaries and applies refuse and reset."""
        reader = link.client_reader
        while True:
            try:
                data = await reader.read(CHUNK_SIZE)
            except OSError:
                return
            if not data:
                return
            if link.response_seen:  # the client speaks after an answer: a new request
                self._begin_request(link)
                if link.fault == "refuse":
                    return
            if link.fault == "reset":
                link.request_buf += data
                if request_complete(link.request_buf):
                    link.rst = True
                    return
                continue
            upstream = link.upstream_writer
            if upstream is None:
                return
            try:
                upstream.write(data)
                await upstream.drain()
            except OSError:
                return

    async def _pump_responses(self, link: _Link) -> None:
        """Upstream to client; applies the byte-level faults."""
        reader = link.upstream_reader
        writer = link.client_writer
        if reader is None:
            return
        try:
            while True:
                try:
                    data = await reader.read(CHUNK_SIZE)
                except OSError:
                    data = b""
                if data:
                    link.response_seen = True
                if link.passthrough:
                    if not data:
                        return
                    writer.write(data)
                    await writer.drain()
                    continue
                fault = link.fault
                if fault == "delay":
                    if not data:
                        return
                    await asyncio.sleep(self.config.delay_seconds)
                    writer.write(data)
                    await writer.drain()
                elif fault == "stall_before":
                    link.held += data
                    if link.held:
                        await self._stall(link)
                        link.passthrough = True
                        writer.write(bytes(link.held))
                        link.held.clear()
                        await writer.drain()
                    if not data:
                        return
                else:  # cut or stall_mid
                    limiter = link.limiter
                    assert limiter is not None
                    out, reached = limiter.feed(data) if data else limiter.finish()
                    if out:
                        writer.write(out)
                        await writer.drain()
                    if reached:
                        if fault == "cut":
                            return
                        await self._stall(link)
                        link.passthrough = True
                        rest = limiter.rest()
                        if rest:
                            writer.write(rest)
                            await writer.drain()
                    if not data:
                        return
        except OSError:
            return
