"""The send path: one HTTP request from concurrency slot to outcome, and every error it ends in.

``Transport.open()`` is the one place that takes a slot (bounded by ``Timeout.pool``), sets
the attempt header, sends, translates aiohttp's errors (``_errormap.ErrorMap``, the only
code that catches them), and decides redirect / status error / body, applying the one content-type
rule of both paths. A 2xx comes back as an ``Opened`` response that still holds its slot;
reading a whole reply (``Transport.fetch``) and reading a stream (``_streaming``) are its
two consumers, and both count the body the same way: decoded bytes and bytes on the wire,
capped at ``max_reply_bytes`` over the whole body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from ._call import ATTEMPT_HEADER, Call, Redirect, Reply, deadline_expired
from ._config import DNS_CACHE_TTL, KEEPALIVE_TIMEOUT, SOCKET_READ_SIZE
from ._decoders import refusal_message, refused_media_type
from ._errormap import ErrorMap
from ._exceptions import (
    ClientClosedError,
    ContractError,
    EndpointTimeoutError,
    ModalLLMError,
    PoolTimeoutError,
    ReplyTooLargeError,
    TransportError,
    status_error_class,
)
from ._pacing import Slots
from ._retry import parse_retry_after
from ._watch import FirstByteWatch, SilenceWatch

if TYPE_CHECKING:
    from ._config import ClientOptions
    from ._watch import SilenceEntry

__all__ = ["ERROR_BODY_LIMIT", "Opened", "PoolStats", "Transport"]

FOLLOWED_REDIRECTS: Final = frozenset({301, 302, 303})
REFUSED_REDIRECTS: Final = frozenset({307, 308})
ERROR_BODY_LIMIT: Final = 64 * 1024
"""How much of an error body (or a refused HTML page) is read for the error's excerpt."""


class Opened:
    """A 2xx response whose body is still to be read, holding a concurrency slot.

    ``chunk()`` reads the body piecewise: decoded bytes (what aiohttp hands over after any
    ``Content-Encoding``) and bytes on the wire are both counted from the first body byte,
    and the chunk that takes either past ``cap`` raises ``ReplyTooLargeError`` before it
    is used. ``release()`` gives back the connection (to the pool only when the body was
    read to its end) and the slot, exactly once.
    """

    __slots__ = (
        "_slot",
        "cap",
        "content_type",
        "encoded",
        "errors",
        "received",
        "resp",
        "silence",
        "status",
        "url",
    )

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        content_type: str | None,
        errors: ErrorMap,
        slot: Slots,
        cap: int,
    ) -> None:
        self.resp = resp
        self.errors = errors
        self._slot: Slots | None = slot
        self.cap = cap
        self.status = resp.status
        self.url = errors.url
        self.content_type = content_type
        encoding = resp.headers.get("Content-Encoding")
        self.encoded = encoding is not None and encoding.strip().lower() != "identity"
        self.received = 0
        self.silence: SilenceEntry | None = None  # a stream's read timeout (SilenceWatch)

    async def chunk(self, deadline_at: float | None = None) -> bytes:
        """The next decoded chunk of the body, ``b""`` at its end; errors are ours."""
        content = self.resp.content
        try:  # not ``with self.errors``: its __enter__ and __exit__ are two calls per piece
            if deadline_at is None:
                data = await content.readany()
            else:
                remaining = deadline_at - asyncio.get_running_loop().time()
                if remaining <= 0:
                    raise _deadline_passed(self.url)
                try:
                    data = await asyncio.wait_for(content.readany(), remaining)
                except asyncio.TimeoutError as exc:
                    if not deadline_expired(exc):
                        raise  # the read timeout (aiohttp's ServerTimeoutError): mapped below
                    raise _deadline_passed(self.url) from None
        except Exception as exc:
            mapped = self.errors.mapped(exc)
            if mapped is None:
                raise
            raise mapped from exc
        self.received += len(data)
        if self.received > self.cap:
            raise self.too_large(f"after {self.received} bytes")
        if self.encoded and getattr(content, "total_raw_bytes", 0) > self.cap:
            raise self.too_large(f"after {content.total_raw_bytes} bytes on the wire")
        return data

    async def read_all(self) -> bytes:
        """The whole body (the unary consumer), within the cap."""
        resp = self.resp
        if not self.encoded:
            length = resp.content_length
            if length is not None:  # the usual reply: its size is known before reading it
                if length > self.cap:
                    raise self.too_large(f"(Content-Length {length})")
                with self.errors:
                    body = await resp.read()
                self.received = len(body)
                return body
        chunks: list[bytes] = []
        while True:
            data = await self.chunk()
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    def too_large(self, detail: str) -> ReplyTooLargeError:
        return _too_large(self.cap, self.status, self.url, detail)

    def release(self, *, reuse: bool = False) -> None:
        """Give back the connection and the slot; ``reuse`` when the body was read whole."""
        silence, self.silence = self.silence, None
        if silence is not None:
            silence.cancel()
        if reuse:
            self.resp.release()
        else:
            self.resp.close()
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()

    @property
    def holds_slot(self) -> bool:
        return self._slot is not None


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one client's concurrency slots and connection pool (``client.pool``).

    For leak checks and dashboards: once every call has returned and every stream is
    closed, ``slots_in_use`` and ``connections_in_use`` are back to 0. The figures are
    read when asked for; nothing is counted on the request path.
    """

    max_concurrency: int
    """Concurrency slots in all (the client's ``max_concurrency``)."""
    slots_in_use: int
    """Slots held now: requests in flight and streams not yet closed."""
    connections_in_use: int
    """Connections checked out of the pool: a request, or a body not yet read, on each."""
    connections_idle: int
    """Kept-alive connections waiting in the pool for reuse."""


def _too_large(cap: int, status: int, url: str, detail: str) -> ReplyTooLargeError:
    return ReplyTooLargeError(
        f"reply exceeds max_reply_bytes={cap} {detail}", status_code=status, url=url
    )


def _deadline_passed(url: str) -> EndpointTimeoutError:
    return EndpointTimeoutError("the call's deadline passed", phase="deadline", url=url)


class Transport:
    """The pooled session of one event loop, its concurrency slots, first-byte watch and
    streams' read-timeout watch."""

    __slots__ = (
        "cap",
        "closed",
        "endpoint_url",
        "max_concurrency",
        "session",
        "silence",
        "slots",
        "watch",
    )

    @classmethod
    def open_session(
        cls,
        options: ClientOptions,
        timeout: aiohttp.ClientTimeout,
        loop: asyncio.AbstractEventLoop,
    ) -> Transport:
        """A new pooled session for ``loop`` (no cookies, no proxy from the environment)."""
        connector = aiohttp.TCPConnector(
            limit=options.connection_limit,
            limit_per_host=options.connection_limit,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            ttl_dns_cache=DNS_CACHE_TTL,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return cls(session, options, FirstByteWatch(loop))

    def __init__(
        self,
        session: aiohttp.ClientSession,
        options: ClientOptions,
        watch: FirstByteWatch,
    ) -> None:
        self.session = session
        self.endpoint_url = options.endpoint_url
        self.max_concurrency = options.max_concurrency
        self.slots = Slots(options.max_concurrency)
        self.watch = watch
        self.silence = SilenceWatch(watch.loop)
        self.cap = options.max_reply_bytes
        self.closed = False

    def stats(self) -> PoolStats:
        """The slots and connections in use now (see ``PoolStats``)."""
        # The one place that reads aiohttp's internals, as it has no public count:
        # BaseConnector._acquired and ._conns.
        connector = self.session.connector
        in_use = idle = 0
        if connector is not None and not connector.closed:
            in_use = len(connector._acquired)
            idle = sum(len(conns) for conns in list(connector._conns.values()))
        held = self.slots.size - self.slots.free
        return PoolStats(self.max_concurrency, held, in_use, idle)

    async def _acquire_within(self, call: Call, url: str) -> None:
        """Take a concurrency slot, waiting at most ``call.pool`` seconds (not None)."""
        assert call.pool is not None
        try:
            await asyncio.wait_for(self.slots.take(), call.pool)
        except asyncio.TimeoutError:
            n = self.max_concurrency
            raise PoolTimeoutError(
                f"all {n} concurrency slots stayed held for {call.pool:g} s (Timeout.pool); "
                "close streams you leave early ('async with client.stream(...)' on "
                "AsyncClient, .close() on Client.stream()'s generator)",
                slots=n,
                timeout=call.pool,
                url=url,
            ) from None

    def open(
        self, method: str, url: str, data: bytes | None, call: Call, attempt: int
    ) -> Coroutine[Any, Any, Opened | Redirect]:
        """Send one request and decide what came back (the one send path, ``_send``).

        Returns a ``Redirect`` (slot already released), or an ``Opened`` 2xx whose slot the
        caller releases; raises a ``StatusError`` (body excerpt read, ``Retry-After``
        parsed), a ``ContractError`` for a refused content type, or a translated transport
        error, with nothing left held.
        """
        return self._send(method, url, data, call, attempt, False)  # type: ignore[return-value]

    def fetch(
        self, method: str, url: str, data: bytes | None, call: Call, attempt: int
    ) -> Coroutine[Any, Any, Reply | Redirect]:
        """One request whose 2xx body is read whole: ``open`` and ``Opened.read_all`` in one
        coroutine (the unary consumer), the slot and connection released before it returns."""
        return self._send(method, url, data, call, attempt, True)  # type: ignore[return-value]

    async def _send(
        self, method: str, url: str, data: bytes | None, call: Call, attempt: int, whole: bool
    ) -> Opened | Reply | Redirect:
        session = self.session
        if self.closed:
            raise ClientClosedError("Cannot use a closed client; create a new one.", url=url)
        headers = call.headers
        if attempt != 1:
            headers = {**headers, ATTEMPT_HEADER: str(attempt)}
        call.sent += 1
        slot = self.slots  # a concurrency slot, waiting at most Timeout.pool for it
        if not slot.take_now():
            if call.pool is None:
                await slot.take()
            else:
                await self._acquire_within(call, url)
        resp: aiohttp.ClientResponse | None = None
        # The first-byte clock starts once we hold a slot: queueing is not the endpoint's.
        first_byte = call.first_byte
        watch = self.watch
        if first_byte is not None:
            task: Any = asyncio.current_task()
            bucket = watch.start(first_byte, task)
        try:
            try:
                # ``ClientSession._request`` is what ``request()`` wraps in a context manager
                # that we would only await: calling it saves that wrapper, a dict of the
                # keyword arguments and a hop on each resume (about 2 % of a request). Looked
                # up per call, so a test double or tracer patching it (aioresponses, ddtrace)
                # still sees every request.
                resp = await session._request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                    timeout=call.aio_timeout,
                )
            except asyncio.CancelledError:
                if first_byte is not None and watch.expired(task):
                    raise EndpointTimeoutError(
                        "timed out waiting for the first byte of the reply",
                        phase="first_byte",
                        url=url,
                    ) from None
                raise
            except Exception as exc:  # an ErrorMap only once something failed
                mapped = ErrorMap(self, url).mapped(exc)
                if mapped is None:
                    raise
                raise mapped from exc
            finally:
                if first_byte is not None:
                    bucket.discard(task)  # FirstByteWatch.stop
            if call.read_timeout is not None and not resp.content.is_eof():
                _set_read_timeout(resp, call.read_timeout)  # error bodies can stall too
            status = resp.status
            headers_in = resp.headers
            if status >= 300:
                if status in FOLLOWED_REDIRECTS or status in REFUSED_REDIRECTS:
                    location = headers_in.get("Location")
                    if location:
                        resp.release()
                        slot.release()
                        return Redirect(status, location, url)
                raise await self._status_error(resp, ErrorMap(self, url, resp))
            content_type = headers_in.get("Content-Type")
            refused = refused_media_type(content_type)
            if refused is not None:
                body = await _excerpt_of(resp, ErrorMap(self, url, resp))
                raise ContractError(
                    refusal_message(refused),
                    status_code=status,
                    body=body,
                    url=url,
                )
            if whole and "Content-Encoding" not in headers_in:
                length = resp.content_length
                if length is not None:  # the usual reply: its size is known before reading it
                    if length > self.cap:
                        raise _too_large(self.cap, status, url, f"(Content-Length {length})")
                    try:
                        body = await resp.read()
                    except Exception as exc:
                        mapped = ErrorMap(self, url, resp).mapped(exc)
                        if mapped is None:
                            raise
                        raise mapped from exc
                    reply = Reply(status, body, url, content_type)
                    resp.release()
                    slot.release()
                    return reply
            opened = Opened(resp, content_type, ErrorMap(self, url, resp), slot, self.cap)
        except BaseException:
            if resp is not None:
                resp.close()
            slot.release()
            raise
        if whole:
            try:
                body = await opened.read_all()
            except BaseException:
                opened.release()
                raise
            opened.release(reuse=True)
            return Reply(status, body, url, content_type)
        if call.kind == "stream":
            self._watch_silence(opened)
        return opened

    def _watch_silence(self, opened: Opened) -> None:
        """Move a stream's between-chunks timeout from aiohttp, which re-arms a loop timer
        on every packet, to the shared ``SilenceWatch`` (the same timeout, no per-piece
        cost). Whatever aiohttp was set to wait is what the watch waits. And read the
        stream's many small packets ``SOCKET_READ_SIZE`` bytes at a time."""
        resp = opened.resp
        connection = resp.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is None or resp.content.is_eof():
            return
        transport = protocol.transport
        if getattr(transport, "max_size", 0) > SOCKET_READ_SIZE:  # asyncio's selector one
            transport.max_size = SOCKET_READ_SIZE  # type: ignore[union-attr]
        seconds = protocol.read_timeout
        if not seconds:
            return
        protocol.read_timeout = None
        protocol.start_timeout()  # cancels aiohttp's running timer (no timeout: none re-armed)
        opened.silence = self.silence.watch(opened, seconds)

    async def _status_error(self, resp: aiohttp.ClientResponse, errors: ErrorMap) -> ModalLLMError:
        """Read (a bounded part of) an error body and build the matching ``StatusError``."""
        body = await _excerpt_of(resp, errors)
        headers = resp.headers
        cls = status_error_class(resp.status)
        return cls(
            status_code=resp.status,
            reason=resp.reason or "",
            body=body,
            headers=headers,
            retry_after=parse_retry_after(headers),
            url=errors.url,
        )


async def _excerpt_of(resp: aiohttp.ClientResponse, errors: ErrorMap) -> bytes:
    """Up to ``ERROR_BODY_LIMIT`` bytes of a body: read until the limit or its end, however
    many chunks that takes, each wait bounded by the read timeout. Leaves the connection
    released when the body was read whole, else closed.

    A body that stalls past the read timeout, is cut, or cannot be decoded ends the excerpt
    with what arrived: the status the server sent is the outcome, not the failed read.
    """
    chunks: list[bytes] = []
    size = 0
    content = resp.content
    try:
        with errors:
            while size < ERROR_BODY_LIMIT:
                chunk = await content.readany()
                if not chunk:
                    resp.release()  # read whole: the connection goes back to the pool
                    return b"".join(chunks)
                chunks.append(chunk)
                size += len(chunk)
    except (TransportError, ContractError):
        pass
    resp.close()
    return b"".join(chunks)[:ERROR_BODY_LIMIT]


def _set_read_timeout(resp: aiohttp.ClientResponse, seconds: float) -> None:
    """Switch the socket from the first-byte timeout to the between-chunks timeout.

    aiohttp has one ``sock_read`` for both; its own websocket code adjusts
    ``protocol.read_timeout`` the same way once the handshake is done.
    """
    if resp.content.is_eof():
        # The whole body is in (the usual case for a JSON reply); aiohttp dropped the
        # timer at EOF, and a re-armed one would fire later on an idle pooled socket.
        return
    connection = resp.connection
    if connection is not None and connection.protocol is not None:
        protocol = connection.protocol
        protocol.read_timeout = seconds
        # The running timer still counts the first-byte timeout until the next data
        # arrives; restart it so the between-chunks timeout applies from now on.
        protocol.start_timeout()
