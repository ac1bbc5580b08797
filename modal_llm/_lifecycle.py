"""``PooledClient``: the lifecycle of an ``AsyncClient``'s connection pool.

One pooled aiohttp session (inside a ``Transport``) per client, created in the first event
loop that uses it and bound to it; ``aclose()``; and what a leak looks like: one line of
our own naming the fix, never aiohttp's "Unclosed client session".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sys
import warnings
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp

from ._call import CallFactory
from ._config import ClientOptions, ClientSettings
from ._exceptions import ClientClosedError, redact_url
from ._send import PoolStats, Transport
from ._telemetry import instrumentation_for

if sys.version_info >= (3, 11):  # bound at run time too: typing.get_type_hints needs them
    from typing import Self, Unpack
else:
    from typing_extensions import Self, Unpack

if TYPE_CHECKING:
    from ._otel import Instrumentation

__all__ = ["PooledClient", "State"]

log = logging.getLogger("modal_llm")


class State(enum.Enum):
    UNOPENED = 1  # no session yet: it is created inside the first running loop that uses us
    OPENED = 2  # a session exists and belongs to ``_loop``
    CLOSED = 3  # aclose() ran; the client cannot be reopened


class PooledClient:
    """The session, slots and lifecycle under ``AsyncClient`` (its public face)."""

    _state = State.CLOSED  # so __del__ is quiet if __init__ failed before setting it
    _session: aiohttp.ClientSession | None = None

    def __init__(self, endpoint_url: str | None = None, **options: Unpack[ClientSettings]) -> None:
        self._init(ClientOptions.build(endpoint_url, **options))

    @classmethod
    def from_options(cls, options: ClientOptions) -> Self:
        """Build a client from already resolved options (used by the blocking ``Client``)."""
        self = cls.__new__(cls)
        self._init(options)
        return self

    def _init(self, options: ClientOptions) -> None:
        self._options = options
        self._url = options.endpoint_url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: Transport | None = None
        self._calls = CallFactory(options)
        self._secrets = self._calls.secrets
        self._telemetry: Instrumentation | None = None  # decided when the transport opens
        self._state = State.UNOPENED

    @property
    def options(self) -> ClientOptions:
        """The resolved settings (credentials are hidden in its repr)."""
        return self._options

    @property
    def endpoint_url(self) -> str:
        return self._url

    @property
    def pool(self) -> PoolStats:
        """What the client holds now: slots in use, connections in use and idle.

        A ``PoolStats`` snapshot, read-only; all zero before the first call. Once every call
        has returned and every stream is closed, ``slots_in_use`` and
        ``connections_in_use`` are 0 (a check for leaks).
        """
        transport = self._transport
        if transport is None:
            return PoolStats(self._options.max_concurrency, 0, 0, 0)
        return transport.stats()

    def __repr__(self) -> str:
        return f"<AsyncClient {redact_url(self._url)} {self._state.name.lower()}>"

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._session_for_loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent; the client cannot be used afterwards.

        Streams still open are cut at once (``StreamInterruptedError``, ``ended_by="client"``)
        and calls reading a reply end with ``ClientClosedError``.
        """
        session, self._session = self._session, None
        self._state = State.CLOSED
        if self._transport is not None:
            self._transport.closed = True
        if session is not None and not session.closed:
            _wake_body_readers(session)
            await session.close()

    def __del__(self, _warnings: Any = warnings) -> None:
        # Never await here: the loop may be closed. Tell the user about the leak in one
        # line of our own, and keep aiohttp from adding its "Unclosed client session".
        session = self._session
        if self._state is not State.OPENED or session is None or session.closed:
            return
        message = (
            f"AsyncClient for {redact_url(self._url)} was never closed; use "
            "'async with AsyncClient(...) as client:' or 'await client.aclose()'"
        )
        connector = session.connector
        session.detach()
        if connector is not None:
            with contextlib.suppress(Exception):  # aiohttp's own __del__, minus its warning
                connector._close()
        log.warning(message)
        _warnings.warn(message, ResourceWarning, source=self, stacklevel=1)

    def _session_for_loop(self) -> aiohttp.ClientSession:
        return self._transport_for_loop().session

    def _transport_for_loop(self) -> Transport:
        loop = asyncio.get_running_loop()
        transport = self._transport
        if transport is not None and self._loop is loop and not transport.closed:
            return transport
        if self._state is State.CLOSED:
            raise ClientClosedError("Cannot use a closed client; create a new one.")
        if transport is not None:
            raise ClientClosedError(
                "this AsyncClient belongs to another event loop; create one client per loop "
                "(or use modal_llm.Client from synchronous code)"
            )
        opts = self._options
        self._transport = transport = Transport.open_session(opts, self._calls.aio_timeout, loop)
        self._session = transport.session
        self._telemetry = instrumentation_for(
            opts.endpoint_url,
            tracer_provider=opts.tracer_provider,
            meter_provider=opts.meter_provider,
            capture_content=opts.capture_content,
        )
        self._loop = loop
        self._state = State.OPENED
        return transport


def _wake_body_readers(session: aiohttp.ClientSession) -> None:
    """End every read of a reply body in flight with a connection error (then mapped to
    ``ClientClosedError``, or a stream's ``StreamInterruptedError(ended_by="client")``).

    aiohttp's close drops each connection's body reader without waking it (its
    ``ResponseHandler.close`` forgets the payload before ``connection_lost``), so a call
    reading a body would wait forever. Only on close: nothing is tracked per call.
    """
    for protocol in list(getattr(session.connector, "_acquired", ())):
        payload = getattr(protocol, "_payload", None)
        if payload is not None and payload.exception() is None:
            payload.set_exception(aiohttp.ClientConnectionError("the client was closed"))
