"""The in-loop local endpoint (:func:`local_endpoint`) and what both local endpoints share:
switches, recorded requests, counters, ``configure``."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from modal_llm._exceptions import ConfigError
from modal_llm.server import (
    ENDPOINT,
    RecordedRequest,
    Script,
    ServerConfig,
    ServerStats,
    create_app,
    serve,
)

TEST_DEFAULTS: dict[str, Any] = {"retry_after": "0"}
"""Where the local endpoints differ from ``ServerConfig()``: a 429 says ``Retry-After: 0``,
so that a client retries a rate limit at once and a test of a 429 storm takes no time."""

_SWITCHES = frozenset(f.name for f in dataclasses.fields(ServerConfig)) | {"script"}


def _split(
    base: ServerConfig, switches: dict[str, Any]
) -> tuple[ServerConfig, list[object] | None]:
    """(config, script or None) from keyword switches; ConfigError for an unknown name."""
    unknown = sorted(set(switches) - _SWITCHES)
    if unknown:
        raise ConfigError(
            f"unknown endpoint switch {', '.join(unknown)}; "
            f"the switches are ServerConfig's fields and script"
        )
    values = dict(switches)
    script = values.pop("script", None)
    if script is not None and (
        isinstance(script, (str, bytes, dict)) or not isinstance(script, Iterable)
    ):
        raise ConfigError("script must be a sequence of entries, e.g. [429, 'hello']")
    entries = None if script is None else list(script)
    if entries is not None:
        Script(entries)  # validate before anything changes
    return dataclasses.replace(base, **values), entries


class BaseLocalEndpoint:
    """What :class:`AsyncLocalEndpoint` and :class:`LocalEndpoint` share."""

    def __init__(self, **switches: Any) -> None:
        config, script = _split(ServerConfig(**TEST_DEFAULTS), switches)
        self._app = create_app(config, record_requests=True)
        self._endpoint = self._app[ENDPOINT]
        if script is not None:
            self._endpoint.script.replace(script)
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT/``; the endpoint answers on every path."""
        if self._url is None:
            raise RuntimeError("the endpoint is not running: use it as a context manager")
        return self._url

    @property
    def host(self) -> str:
        """``"127.0.0.1"``: where to point a :class:`~modal_llm.testing.FaultProxy`."""
        return "127.0.0.1"

    @property
    def port(self) -> int:
        """The port it listens on (free when it started)."""
        return int(self.url.rstrip("/").rsplit(":", 1)[1])

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far (a copy), in arrival order: POSTs and result GETs."""
        return list(self._endpoint.requests or ())

    @property
    def posts(self) -> list[RecordedRequest]:
        """The POSTs among :attr:`requests`: one per attempt a client made."""
        return [r for r in self.requests if r.method == "POST"]

    @property
    def bodies(self) -> list[Any]:
        """The body of each POST, JSON-decoded (raw bytes when it was not JSON)."""
        return [r.body for r in self.posts]

    @property
    def stats(self) -> ServerStats:
        """The counters: ``posts``, ``gets``, ``statuses``, ``disconnects``, ``cold_starts``..."""
        return self._endpoint.stats

    @property
    def config(self) -> ServerConfig:
        """The switches in force."""
        return self._endpoint.config

    @property
    def script_left(self) -> int:
        """How many scripted replies are still to play."""
        return len(self._endpoint.script)

    def configure(self, **switches: Any) -> None:
        """Change switches from the next request on; the others keep their values.

        ``script=[...]`` replaces the entries left. The fault numbering starts over
        (``error_burst`` counts from here) and ``cold_start=`` makes the next POST cold.
        Raises ConfigError for an unknown switch or a bad value, changing nothing.
        """
        config, script = _split(self._endpoint.config, switches)
        self._apply(config, script)

    def _apply(self, config: ServerConfig, script: list[object] | None) -> None:
        self._endpoint.configure(config)
        if script is not None:
            self._endpoint.script.replace(script)

    def __repr__(self) -> str:
        where = self._url or "not running"
        return f"<{type(self).__name__} {where} posts={self._endpoint.stats.posts}>"


class AsyncLocalEndpoint(BaseLocalEndpoint):
    """The reference endpoint on the running loop; ``async with`` starts and stops it.

    Usage::

        async with local_endpoint(script=[429, "hello"]) as endpoint:
            async with AsyncClient(endpoint.url) as client:
                assert await client.generate("hi") == "hello"
            assert [r.status for r in endpoint.posts] == [429, 200]
    """

    def __init__(self, **switches: Any) -> None:
        super().__init__(**switches)
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> AsyncLocalEndpoint:
        if self._stack is not None:
            raise RuntimeError("a local endpoint can be started only once")
        self._stack = contextlib.AsyncExitStack()
        self._url = await self._stack.enter_async_context(serve(self._app))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        await self._stack.aclose()

    async def wait_for(
        self, predicate: Callable[[ServerStats], bool], timeout: float | None = 10.0
    ) -> None:
        """Return once ``predicate(endpoint.stats)`` holds; TimeoutError after ``timeout``."""
        await self._endpoint.stats.wait_for(predicate, timeout)


def local_endpoint(**switches: Any) -> AsyncLocalEndpoint:
    """The reference endpoint on a free loopback port of the running loop, for ``async with``.

    ``switches`` are :class:`~modal_llm.server.ServerConfig`'s fields (``latency``,
    ``cold_start``, ``rate_limit_every``, ``stream_drop_after``...) and ``script``, a list
    of exact replies consumed one per POST (see docs/testing.md). Defaults are
    ``ServerConfig()``'s except ``retry_after="0"``. Raises ConfigError for an unknown
    switch or a bad value. On exit, every connection, task and socket is closed.
    """
    return AsyncLocalEndpoint(**switches)
