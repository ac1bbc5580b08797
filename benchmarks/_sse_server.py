"""A raw-asyncio SSE endpoint that holds thousands of slow streams at once (workload 6).

``POST /`` with any JSON body answers ``200 text/event-stream`` (chunked, keep-alive):
``--pieces`` events ``data: {"prompt": "<ns> "}``, one every ``--piece-delay`` seconds on a
fixed schedule from the request's arrival, then ``data: [DONE]``. ``<ns>`` is
``time.monotonic_ns()`` taken just before the piece is handed to the kernel, so a client on
the same host (CLOCK_MONOTONIC is system-wide on Linux) measures the delivery delay of every
piece as ``monotonic_ns() - int(piece)``.

No framework: one ``asyncio.Protocol`` per connection and one timer per pending piece, so a
single core sends 40,000+ pieces/s (more on uvloop, used when installed). The file descriptor
limit is raised to its hard maximum at start, and the listen backlog asks for 8,192.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import time
from typing import cast

_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
_DONE_EVENT = b"data: [DONE]\n\n"
_DONE = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_DONE_EVENT), _DONE_EVENT)
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def _piece(now_ns: int) -> bytes:
    event = b'data: {"prompt": "%d "}\n\n' % now_ns
    return b"%x\r\n%s\r\n" % (len(event), event)


class SSEProtocol(asyncio.Protocol):
    """One connection: read a request, stream the pieces on schedule, repeat (keep-alive)."""

    def __init__(self, pieces: int, delay: float) -> None:
        self.pieces = pieces
        self.delay = delay
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.streaming:
            self._maybe_start()

    def _maybe_start(self) -> None:
        assert self.transport is not None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        for line in self.buffer[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    self.transport.write(_BAD)
                    self.transport.close()
                    return
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length :]
        self.streaming = True
        self.transport.write(_HEAD)
        loop = asyncio.get_running_loop()
        self._schedule(loop, loop.time(), 0)

    def _schedule(self, loop: asyncio.AbstractEventLoop, start: float, sent: int) -> None:
        self.timer = loop.call_at(start + sent * self.delay, self._send, loop, start, sent)

    def _send(self, loop: asyncio.AbstractEventLoop, start: float, sent: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if sent < self.pieces:
            transport.write(_piece(time.monotonic_ns()))
            self._schedule(loop, start, sent + 1)
            return
        transport.write(_DONE)
        self.timer = None
        self.streaming = False
        if self.buffer:
            self._maybe_start()


async def serve(host: str, port: int, pieces: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SSEProtocol(pieces, delay), host, port, backlog=8192, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pieces", type=int, default=100)
    parser.add_argument("--piece-delay", type=float, default=0.05)
    args = parser.parse_args()
    raise_nofile()
    coro = serve(args.host, args.port, args.pieces, args.piece_delay)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
