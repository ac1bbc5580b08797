"""Streamed replies: SSE, NDJSON and plain-text pieces, paced, with the stream faults (a drop,
an error event, a missing terminator, keep-alive comments, UTF-8 split across chunks)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from ._config import ServerConfig
from ._contract import dumps, split_bytes
from ._stats import ServerStats

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
CONTENT_TYPES = {
    "sse": "text/event-stream; charset=utf-8",
    "ndjson": "application/x-ndjson",
    "text": "text/plain; charset=utf-8",
}
STREAM_ERROR = {"error": "toy generator failed mid-stream"}
"""The error a stream sends with ``stream_error_after``."""


def stream_chunks(
    config: ServerConfig,
    pieces: list[str],
    stream_format: str,
    events: list[object] | None = None,
) -> tuple[list[bytes], bytes, bytes]:
    """Return (chunk per piece, terminator, error chunk) for streaming ``pieces``.

    SSE and NDJSON carry each piece as ``{"prompt": piece}``, or each of ``events`` as is.
    """
    if stream_format == "text":
        if events is not None:
            pieces = [dumps(event).decode() for event in events]
        if config.split_utf8:
            return split_bytes("".join(pieces).encode(), config.pieces), b"", b""
        return [piece.encode() for piece in pieces], b"", b""
    payloads = events if events is not None else [{"prompt": piece} for piece in pieces]
    if stream_format == "ndjson":
        return [dumps(p) + b"\n" for p in payloads], b"", dumps(STREAM_ERROR) + b"\n"
    every = config.sse_comment_every
    chunks = [
        (KEEPALIVE if every and i % every == 0 else b"") + b"data: " + dumps(payload) + b"\n\n"
        for i, payload in enumerate(payloads)
    ]
    terminator = b"" if config.stream_no_terminator else DONE
    return chunks, terminator, b"event: error\ndata: " + dumps(STREAM_ERROR) + b"\n\n"


async def stream(
    request: web.Request,
    config: ServerConfig,
    stats: ServerStats,
    pieces: list[str],
    stream_format: str,
    on_disconnect: Callable[[], None],
    events: list[object] | None = None,
) -> web.StreamResponse:
    """Stream ``pieces`` (or ``events``) paced and faulted as ``config`` says.

    ``on_disconnect`` runs when the client leaves mid-stream.
    """
    chunks, terminator, error = stream_chunks(config, pieces, stream_format, events)
    stats.generations_started += 1
    resp = web.StreamResponse(
        headers={"Content-Type": CONTENT_TYPES[stream_format], "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    stats.count_status(200)
    stats.notify()
    try:
        for index, chunk in enumerate(chunks):
            if index == config.stream_drop_after:
                return drop(request, resp)
            if index == config.stream_error_after:
                if not error:
                    return drop(request, resp)
                await resp.write(error)
                return resp
            if index > 0:
                if index == 1 and config.gate is not None:
                    await config.gate.wait()
                if config.piece_delay > 0:
                    await asyncio.sleep(config.piece_delay)
            await resp.write(chunk)
        if len(chunks) == config.stream_drop_after:
            return drop(request, resp)
        if len(chunks) == config.stream_error_after:
            if not error:  # a text stream has no error event: it drops
                return drop(request, resp)
            await resp.write(error)
            return resp
        if terminator:
            await resp.write(terminator)
    except ConnectionResetError:
        # The client went away; returning lets aiohttp finish quietly.
        on_disconnect()
        return resp
    stats.generations_finished += 1
    return resp


def drop(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """End the connection mid-body, after flushing what was written."""
    # close() flushes what was written, then ends the connection mid-body: the client sees
    # an incomplete chunked reply, the way a crashed container's stream ends.
    if request.transport is not None:
        request.transport.close()
    return resp
