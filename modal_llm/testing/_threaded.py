"""LocalEndpoint: the reference endpoint on a thread of its own, for blocking code, ``Client``
and LangChain ``invoke`` (and async tests on any loop); ServerThread, the thread itself."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from modal_llm.server import ServerConfig, ServerStats, serve

from ._local import BaseLocalEndpoint

T = TypeVar("T")

START_TIMEOUT = 30.0
"""Seconds to wait for a server thread to start listening or to finish closing."""


class ServerThread:
    """Serve any aiohttp application from a background thread with its own event loop.

    What :class:`LocalEndpoint` runs on; use it for a hand-written fake endpoint that
    blocking code must reach::

        with ServerThread(app) as server:   # app: an aiohttp.web.Application
            requests.post(server.url, json={...})

    ``close()`` stops the server (cancelling its handlers), lets the loop finish and joins
    the thread: no task, socket or thread is left.
    """

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.url = ""
        """The base URL once started, ``http://127.0.0.1:PORT/``."""
        self.loop: asyncio.AbstractEventLoop | None = None
        """The thread's loop while it runs."""
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ServerThread:
        """Start serving; return self once the server listens. Starts once only."""
        if self._thread is not None:
            raise RuntimeError("a server thread can be started only once")
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=asyncio.run,
            args=(self._main(ready),),
            name="modal-llm-server-thread",
            daemon=True,
        )
        self._thread.start()
        try:
            self.url = ready.result(START_TIMEOUT)
        except BaseException:
            self.close()
            raise
        return self

    async def _main(self, ready: concurrent.futures.Future[str]) -> None:
        try:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with serve(self.app) as url:
                ready.set_result(url)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
                return
            raise
        finally:
            self.loop = None

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop the server and join its thread; idempotent."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(START_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("the server thread did not stop")

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the server's loop; return a future of its result."""
        loop = self.loop
        if loop is None:
            coro.close()
            raise RuntimeError("the server thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the server's loop (or here, if it is not running); return it."""
        if not self.running:
            return function()

        async def call() -> T:
            return function()

        return self.submit(call()).result(START_TIMEOUT)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LocalEndpoint(BaseLocalEndpoint):
    """The reference endpoint on a free loopback port, served by a background thread.

    A context manager (or :meth:`start` and :meth:`close`); the switches are those of
    :func:`~modal_llm.testing.local_endpoint`. Its thread runs its own event loop, so the
    test's thread may block (``Client``, LangChain ``invoke``) or run any loop of its own.
    ``close()`` stops the server, cancels what it still runs and joins the thread.

    Usage::

        with LocalEndpoint(script=[503, "hello"]) as endpoint:
            with Client(endpoint.url, retry=RetryPolicy(wait_initial=0, jitter=0)) as client:
                assert client.generate("hi") == "hello"
            assert endpoint.stats.statuses == {503: 1, 200: 1}
    """

    def __init__(self, **switches: Any) -> None:
        super().__init__(**switches)
        self._server = ServerThread(self._app)

    def start(self) -> LocalEndpoint:
        """Start serving; return self once the endpoint listens. Starts once only."""
        if self._server.url or self._server.running:
            raise RuntimeError("a local endpoint can be started only once")
        self._url = self._server.start().url
        return self

    def close(self) -> None:
        """Stop the server and join its thread; idempotent."""
        self._server.close()

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _apply(self, config: ServerConfig, script: list[object] | None) -> None:
        self._server.call(lambda: super(LocalEndpoint, self)._apply(config, script))

    def wait_for(
        self, predicate: Callable[[ServerStats], bool], timeout: float | None = 10.0
    ) -> None:
        """Block until ``predicate(endpoint.stats)`` holds; TimeoutError after ``timeout``."""
        self._server.submit(self._endpoint.stats.wait_for(predicate, timeout)).result()

    async def wait_for_async(
        self, predicate: Callable[[ServerStats], bool], timeout: float | None = 10.0
    ) -> None:
        """:meth:`wait_for` for async tests: awaits on any loop, never blocks it."""
        future = self._server.submit(self._endpoint.stats.wait_for(predicate, timeout))
        await asyncio.wrap_future(future)
