"""aiohttp's (and the socket's) errors translated into ours: ``ErrorMap``, the only code of
the send path that catches them, and the wording of a body that failed."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Final, Protocol

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError

from ._exceptions import (
    ClientClosedError,
    ConfigError,
    ConnectError,
    ContractError,
    EndpointTimeoutError,
    ModalLLMError,
    RedirectError,
    TransportError,
    printable,
)

__all__ = ["ErrorMap", "TransportState"]


class TransportState(Protocol):
    """What ``ErrorMap`` reads of the ``_send.Transport`` it serves."""

    closed: bool
    endpoint_url: str


class ErrorMap:
    """Translate aiohttp and socket errors raised inside ``with`` into ours.

    ``resp`` (set once the headers are in) tells a first-byte timeout from a read timeout,
    a drop before any response (safe to retry) from a reply cut short, and gives the byte
    count and ``Content-Encoding`` of a body that failed.
    """

    __slots__ = ("resp", "transport", "url")

    def __init__(
        self, transport: TransportState, url: str, resp: aiohttp.ClientResponse | None = None
    ) -> None:
        self.transport = transport
        self.url = url
        self.resp = resp

    @property
    def got_headers(self) -> bool:
        return self.resp is not None

    def __enter__(self) -> ErrorMap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            mapped = self.mapped(exc)
            if mapped is not None:
                raise mapped from exc

    def mapped(self, exc: BaseException) -> ModalLLMError | None:
        """What ``exc`` is raised as (``raise mapped from exc``), or ``None`` to let it through
        as it is: ours, a cancellation, or nothing aiohttp or the socket raises. For the send
        path's hot ``try``/``except``, which builds an ``ErrorMap`` only once something failed.
        """
        if isinstance(exc, (ModalLLMError, asyncio.CancelledError)):
            return None
        if not isinstance(exc, _RAISED_BY_AIOHTTP):
            return None
        return self.translate(exc)

    def translate(self, exc: BaseException) -> ModalLLMError:
        url = self.url
        if self.transport.closed:
            return ClientClosedError("the client was closed while this call was running", url=url)
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return EndpointTimeoutError("timed out connecting", phase="connect", url=url)
        if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
            if self.got_headers:
                return EndpointTimeoutError(
                    "timed out reading the reply body", phase="read", url=url
                )
            return EndpointTimeoutError(
                "timed out waiting for the first byte of the reply", phase="first_byte", url=url
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            return ConnectError(f"cannot connect: {exc.os_error or exc}", url=url)
        if isinstance(exc, aiohttp.InvalidURL):
            if url != self.transport.endpoint_url:  # a Location the server sent
                return RedirectError("redirect to an invalid URL", url=self.transport.endpoint_url)
            return ConfigError(f"invalid URL: {exc}", url=url)
        if isinstance(exc, aiohttp.ClientPayloadError):
            return self._payload_error(exc)
        if isinstance(exc, (aiohttp.ClientConnectionError, OSError)):
            where = "after the reply started" if self.got_headers else "before any reply"
            return ConnectError(
                f"connection lost {where}: {_first_line(exc) or type(exc).__name__}",
                before_response=not self.got_headers,
                url=url,
            )
        if isinstance(exc, aiohttp.ClientResponseError):
            # aiohttp words it "400, message='Bad status line:\n...', url=...": a status
            # nobody sent and the URL again. Its message's own lines up to the raw bytes.
            return ConnectError(
                f"malformed HTTP reply: {_parser_message(exc.message)}",
                before_response=False,
                url=url,
            )
        if isinstance(exc, RuntimeError) and "closed" in str(exc).lower():
            return ClientClosedError(f"session closed: {exc}", url=url)
        if isinstance(exc, RuntimeError):
            raise exc
        if isinstance(exc, (ValueError, ArithmeticError)):
            # yarl/idna (a host label over 63 characters: UnicodeError), a timer's
            # OverflowError...: what aiohttp raises for a URL or value it cannot send.
            if isinstance(exc, UnicodeError):  # "... codec failed (UnicodeError: label too long)"
                detail = f"invalid host name: {str(exc).rpartition(': ')[2].rstrip(')')}"
            else:
                detail = f"{type(exc).__name__}: {_first_line(exc)}"
            if url != self.transport.endpoint_url:  # a Location the server sent
                return RedirectError(
                    f"redirect to a malformed URL ({detail})", url=self.transport.endpoint_url
                )
            return ConfigError(f"cannot send the request ({detail})", url=url)
        return TransportError(f"{type(exc).__name__}: {_first_line(exc)}", url=url)

    def _payload_error(self, exc: aiohttp.ClientPayloadError) -> ModalLLMError:
        """A body that could not be read to its end: undecodable, or cut short.

        aiohttp words both as ``<...Error: 400, message=...>``, a status nobody sent; say
        what happened instead, with the status that did arrive and the bytes read.
        """
        resp, url = self.resp, self.url
        if isinstance(exc.__cause__, ContentEncodingError) or "content-encoding" in str(exc):
            encoding = resp.headers.get("Content-Encoding", "?") if resp is not None else "?"
            return ContractError(
                f"the reply body cannot be decoded as {encoding.strip()!r} (its "
                "Content-Encoding): the server sent something else",
                status_code=None if resp is None else resp.status,
                url=url,
            )
        received = "" if resp is None else f" after {_bytes_read(resp)}"
        return ConnectError(
            f"the connection closed mid-body{received}", before_response=False, url=url
        )


def _bytes_read(resp: aiohttp.ClientResponse) -> str:
    """``"15 of 100 bytes"`` (or ``"15 bytes"`` without a usable Content-Length)."""
    received = getattr(resp.content, "total_bytes", 0)
    length = resp.content_length
    encoded = resp.headers.get("Content-Encoding")
    if length is not None and not encoded:
        return f"{received} of {length} bytes"
    return f"{received} bytes"


_RAISED_BY_AIOHTTP: Final = (
    aiohttp.ClientError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,
    ValueError,
    ArithmeticError,
)
"""Every builtin error aiohttp, yarl or idna raises while sending or reading (what
``mapped`` translates; anything else, a ``TypeError`` say, is a bug and passes)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return printable(text.splitlines()[0][:200]) if text else ""


def _parser_message(message: object) -> str:
    """An HTTP parser's message as one line: ``Bad status line: Invalid status code``,
    without the raw bytes and the caret line it adds below."""
    kept = []
    for line in str(message).splitlines():
        line = line.strip()
        if line.startswith(("b'", 'b"', "^")):
            break
        line = line.split(" b'")[0].split(' b"')[0].rstrip(":. ")  # no raw bytes inline
        if line:
            kept.append(line)
    return printable(": ".join(kept)[:200]) or "unreadable"
