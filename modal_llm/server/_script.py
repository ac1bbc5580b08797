"""Scripted replies: an exact sequence of replies, one consumed by each POST in arrival order.

A script entry is one of:

- an ``int`` status: ``200`` is the toy reply; 400-599 is that status with Modal's usual
  body (401 the proxy's missing-credentials text, 422 FastAPI's validation detail, 500
  "modal-http: internal error", others "modal-http: <reason>"); 429 and 503 carry
  ``Retry-After`` when the endpoint's ``retry_after`` is set;
- a ``str``: the reply text (``{"prompt": text, ...}``, or streamed in ``pieces`` pieces);
- a ``dict``: a raw JSON body sent as is with 200 (a stream sends it as its one event);
- ``"drop"``: the connection is reset (TCP RST) before any reply byte;
- ``"hang"``: no reply at all, until the client leaves or the endpoint closes;
- a :class:`StreamReply`: a stream's exact pieces, then its end (done, a drop, an error event).

The literal texts "drop" and "hang" are sentinels; send ``{"prompt": "drop"}`` to reply
with that text. A scripted POST skips every other switch (auth, faults, cold start,
latency, ``work_time``); only the stream's shape (``stream_format``, ``pieces``,
``piece_delay``, ``sse_comment_every``, ``split_utf8``) still applies. Once the script is
used up, the switches apply again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from modal_llm._exceptions import ConfigError

from ._config import STREAM_FORMATS, ServerConfig
from ._contract import (
    INTERNAL_ERROR,
    MISSING_CREDENTIALS,
    detail_reply,
    dumps,
    is_json_type,
    json_reply,
    lax_bool,
    reply_body,
    split_pieces,
    status_reply,
    text_reply,
    toy_generate,
)
from ._stats import ServerStats
from ._streaming import stream

DROP = "drop"
HANG = "hang"
StreamEnd = Literal["done", "drop", "error"]


@dataclass(frozen=True, slots=True)
class StreamReply:
    """A scripted stream: exactly these pieces, then ``end``.

    ``end="done"`` ends cleanly (SSE ``data: [DONE]``); ``"drop"`` closes the connection
    mid-body; ``"error"`` sends an error event (SSE ``event: error``, NDJSON
    ``{"error": ...}``; a text stream drops instead). A non-streaming POST that gets one is
    answered with the joined pieces, a reset (``"drop"``) or a 500 (``"error"``).
    """

    pieces: Sequence[str]
    end: StreamEnd = "done"

    def __post_init__(self) -> None:
        if isinstance(self.pieces, (str, bytes)):  # iterating it would stream characters
            raise ConfigError(
                f"StreamReply pieces must be a list of strings, not a {type(self.pieces).__name__}"
                f" (one piece: StreamReply([{self.pieces!r}]))"
            )
        object.__setattr__(self, "pieces", tuple(self.pieces))
        if not all(isinstance(piece, str) for piece in self.pieces):
            raise ConfigError("StreamReply pieces must be strings")
        for piece in self.pieces:
            _check_sendable(piece, "a StreamReply piece")
        if self.end not in ("done", "drop", "error"):
            raise ConfigError(
                f'StreamReply end must be "done", "drop" or "error", not {self.end!r}'
            )


ScriptEntry = int | str | dict[str, Any] | StreamReply


def check_entry(entry: object, index: int) -> ScriptEntry:
    """Return ``entry`` if it is a valid script entry, else raise ConfigError naming it."""
    if isinstance(entry, bool) or not isinstance(entry, (int, str, dict, StreamReply)):
        raise ConfigError(
            f"script[{index}] must be a status, a reply text, a JSON object, "
            f'"drop", "hang" or a StreamReply, not {type(entry).__name__}'
        )
    if isinstance(entry, int) and not (entry == 200 or 400 <= entry <= 599):
        raise ConfigError(f"script[{index}]: a status must be 200 or 400-599, not {entry}")
    if isinstance(entry, (str, dict)):
        _check_sendable(entry, f"script[{index}]")
    return entry


def _check_sendable(reply: str | dict[str, Any], what: str) -> None:
    """Refuse a reply the endpoint could not send (a lone surrogate, a value JSON cannot
    hold, such as a set): it would crash the handler on every request that drew it, a 500
    far from the mistake."""
    try:
        json.dumps(reply, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ConfigError(f"{what} cannot be sent as UTF-8 JSON: {exc}") from None


class Script:
    """The entries left to play; :meth:`take` hands out the next one, once."""

    def __init__(self, entries: Iterable[object] = ()) -> None:
        self._left: deque[ScriptEntry] = deque()
        self.replace(entries)

    def replace(self, entries: Iterable[object]) -> None:
        """Drop what is left and play ``entries`` next (validated first: all or nothing)."""
        checked = [check_entry(entry, i) for i, entry in enumerate(entries)]
        self._left = deque(checked)

    def take(self) -> ScriptEntry | None:
        """The next entry, consumed; None once the script is used up."""
        return self._left.popleft() if self._left else None

    def __len__(self) -> int:
        return len(self._left)


def abort_with_rst(transport: asyncio.WriteTransport | None) -> None:
    """Close a connection so that the peer gets a TCP RST, not FIN (``SO_LINGER`` on, 0 s).

    The one way the reference endpoint, the fault proxy and the tests reset a connection.
    """
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def reset(request: web.Request) -> None:
    """Close the request's connection with a TCP RST (``SO_LINGER`` 0)."""
    abort_with_rst(request.transport)


def _parse(raw: bytes, content_type: str | None, config: ServerConfig) -> tuple[str, str | None]:
    """(prompt, stream format or None) of a body, leniently: a bad body is a plain request."""
    body: Any = None
    if is_json_type(content_type):
        with contextlib.suppress(ValueError, RecursionError):
            body = json.loads(raw)
    if not isinstance(body, dict):
        return "", None
    prompt = body.get("prompt")
    fmt = body.get("format", config.stream_format)
    if fmt not in STREAM_FORMATS:
        fmt = config.stream_format
    streaming = lax_bool(body.get(config.stream_flag, False)) and fmt != "json"
    return (prompt if isinstance(prompt, str) else ""), (fmt if streaming else None)


def _status(entry: int, config: ServerConfig) -> web.Response:
    if entry == 401:
        return text_reply(401, MISSING_CREDENTIALS)
    if entry == 422:
        error = {"type": "missing", "loc": ["body", "prompt"], "msg": "Field required"}
        return detail_reply(422, [error])
    if entry == 500:
        return text_reply(500, INTERNAL_ERROR)
    retry_after = config.retry_after
    headers = {"Retry-After": retry_after} if entry in (429, 503) and retry_after else None
    return status_reply(entry, headers)


async def play(
    entry: ScriptEntry,
    request: web.Request,
    raw: bytes,
    config: ServerConfig,
    stats: ServerStats,
    on_disconnect: Callable[[], None],
) -> web.StreamResponse | None:
    """Answer one POST with ``entry``; None means the connection was reset, with no reply."""
    if entry == HANG:
        await asyncio.get_running_loop().create_future()  # cancelled when the client leaves
    if entry == DROP:
        reset(request)
        return None
    if isinstance(entry, int) and entry != 200:
        return _status(entry, config)
    prompt, fmt = _parse(raw, request.headers.get("Content-Type"), config)
    # The stream's shape applies; its faults do not.
    shape = dataclasses.replace(
        config, stream_drop_after=None, stream_error_after=None, stream_no_terminator=False
    )
    events: list[object] | None = None
    if isinstance(entry, StreamReply):
        pieces = list(entry.pieces)
        if entry.end == "drop":
            shape = dataclasses.replace(shape, stream_drop_after=len(pieces))
        elif entry.end == "error":
            shape = dataclasses.replace(shape, stream_error_after=len(pieces))
        if fmt is None:
            if entry.end == "drop":
                reset(request)
                return None
            if entry.end == "error":
                return text_reply(500, INTERNAL_ERROR)
            return json_reply(reply_body(prompt, "".join(pieces)))
    elif isinstance(entry, dict):
        if fmt is None:
            return json_reply(dumps(entry))
        pieces, events = [], [entry]
    else:
        text = toy_generate(prompt, echo_prompt=config.echo_prompt) if entry == 200 else entry
        assert isinstance(text, str)
        if fmt is None:
            return json_reply(reply_body(prompt, text))
        pieces = split_pieces(text, config.pieces)
    return await stream(request, shape, stats, pieces, fmt, on_disconnect, events)
