"""LocalEndpoint: the reference endpoint on a thread of its own, for blocking code, ``Client``
and LangChain ``invoke`` (and async tests on any loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from modal_llm.server import ServerConfig, ServerStats, serve

from ._local import BaseLocalEndpoint

START_TIMEOUT = 30.0
"""Seconds to wait for the endpoint's thread to start listening or to finish closing."""


class LocalEndpoint(BaseLocalEndpoint):
    """The reference endpoint on a free loopback port, served by a background thread.

    A context manager (or :meth:`start` and :meth:`close`); the switches are those of
    :func:`~modal_llm.testing.local_endpoint`. Its thread runs its own event loop, so the
    test's thread may block (``Client``, LangChain ``invoke``) or run any loop of its own.
    ``close()`` stops the server, cancels what it still runs and joins the thread.

    Usage::

        with LocalEndpoint(script=[503, "hello"]) as endpoint:
            with Client(endpoint.url, retry=RetryPolicy(wait_initial=0, jitter=0)) as client:
                assert client.generate("hi").text == "hello"
            assert endpoint.stats.statuses == {503: 1, 200: 1}
    """

    def __init__(self, **switches: Any) -> None:
        super().__init__(**switches)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalEndpoint:
        """Start serving; return self once the endpoint listens. Starts once only."""
        if self._thread is not None:
            raise RuntimeError("a local endpoint can be started only once")
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=asyncio.run,
            args=(self._main(ready),),
            name="modal-llm-local-endpoint",
            daemon=True,
        )
        self._thread.start()
        try:
            self._url = ready.result(START_TIMEOUT)
        except BaseException:
            self.close()
            raise
        return self

    async def _main(self, ready: concurrent.futures.Future[str]) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with serve(self._app) as url:
                ready.set_result(url)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
                return
            raise

    def close(self) -> None:
        """Stop the server and join its thread; idempotent."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(START_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("the local endpoint's thread did not stop")

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the endpoint's loop and return its result."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return function()  # not running: nothing to race with

        async def call() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(START_TIMEOUT)

    def _apply(self, config: ServerConfig, script: list[object] | None) -> None:
        self._call(lambda: super(LocalEndpoint, self)._apply(config, script))

    def wait_for(
        self, predicate: Callable[[ServerStats], bool], timeout: float | None = 10.0
    ) -> None:
        """Block until ``predicate(endpoint.stats)`` holds; TimeoutError after ``timeout``."""
        self._future(predicate, timeout).result()

    async def wait_for_async(
        self, predicate: Callable[[ServerStats], bool], timeout: float | None = 10.0
    ) -> None:
        """:meth:`wait_for` for async tests: awaits on any loop, never blocks it."""
        await asyncio.wrap_future(self._future(predicate, timeout))

    def _future(
        self, predicate: Callable[[ServerStats], bool], timeout: float | None
    ) -> concurrent.futures.Future[None]:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the endpoint is not running: use it as a context manager")
        coro = self._endpoint.stats.wait_for(predicate, timeout)
        return asyncio.run_coroutine_threadsafe(coro, loop)
