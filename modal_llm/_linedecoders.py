"""The line-based stream decoders: Server-Sent Events and NDJSON (sans-IO), with the JSON
item rules they share. Picked by ``_decoders.decoder_for``; see there for the contract."""

from __future__ import annotations

import codecs
import contextlib
import json
import re
from collections.abc import Callable
from typing import Any, Final

from ._exceptions import (
    ContractError,
    ModalLLMError,
    ReplyTooLargeError,
    ServerStreamError,
    StreamInterruptedError,
    excerpt,
)

__all__ = ["DEFAULT_MAX_BUFFER", "NDJSON_TYPES", "NDJSONDecoder", "SSEDecoder"]

DEFAULT_MAX_BUFFER = 16 * 1024 * 1024
"""Largest partial line, pending event or JSON body a decoder holds before giving up."""

_LINE_END = re.compile(r"\r\n|\r|\n")
NDJSON_TYPES: Final = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonl",
        "application/jsonlines",
        "application/x-jsonlines",
        "application/json-seq",
    }
)
# Bytes stripped around an NDJSON line: JSON whitespace (LF is the separator) plus the
# RFC 7464 record separator that starts each application/json-seq record.
_NDJSON_STRIP = b" \t\r\x1e"
_UTF8_BOM = b"\xef\xbb\xbf"
_NOT_JSON: Final = "stream line is not valid JSON"


_Scanner = Callable[[str, int], tuple[Any, int]]
_scan_once: _Scanner = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
"""The C scanner ``JSONDecoder.raw_decode`` wraps: ``(value, end)``, ``StopIteration``
when no value starts at the index, ``JSONDecodeError`` for a broken one."""


def _loads(text: str) -> Any:
    """``json.loads`` for text that starts with its value, about 4x faster on small items.

    ``loads`` runs a whitespace regex on both ends; callers here have stripped the start.
    """
    try:
        value, end = _scan_once(text, 0)
    except StopIteration as err:
        raise json.JSONDecodeError("Expecting value", text, err.value) from None
    if end != len(text) and text[end:].strip(" \t\n\r"):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _too_large(limit: int) -> ReplyTooLargeError:
    return ReplyTooLargeError(f"streamed reply holds more than {limit} bytes without a break")


def _server_message(value: Any) -> str:
    """The human part of an error payload: ``{"error": {"message": "..."}}`` -> ``"..."``."""
    while isinstance(value, dict):
        for key in ("error", "message", "detail"):
            inner = value.get(key)
            if inner is not None:
                value = inner
                break
        else:
            break
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # pragma: no cover - decoded JSON always dumps
        return repr(value)


def _stream_error(message: str) -> ServerStreamError:
    return ServerStreamError(
        f"the server reported an error in the stream: {excerpt(message)}",
        server_message=message,
    )


def _piece_from_value(value: Any, raw: str | bytes) -> str | None:
    """The text piece a decoded JSON item carries: ``""`` for metadata, None if not an item."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        return None
    # "error": null, false or "" counts as no error: some servers send the key on every item.
    error = value.get("error")
    if error is not None and error is not False and error != "":
        raise _stream_error(_server_message(error))
    if "prompt" not in value:
        return ""  # metadata such as usage
    prompt = value["prompt"]
    if isinstance(prompt, str):
        return prompt
    raise ContractError('stream item\'s "prompt" is not a string', body=raw)


class _LineDecoder:
    """Shared state of the line-based decoders: limits, termination and a deferred error
    (``error``: sticky, raised by the next ``feed()`` or ``finish()``)."""

    __slots__ = ("_max", "error", "requires_terminator", "terminated")

    def __init__(self, *, requires_terminator: bool, max_buffer: int) -> None:
        self.requires_terminator = requires_terminator
        self.terminated = False
        self._max = max_buffer
        self.error: ModalLLMError | None = None

    def _hold(self, partial: list[Any], size: int, chunk: str | bytes) -> int:
        """Keep an unfinished line; return its new size; refuse past ``max_buffer``."""
        partial.append(chunk)
        size += len(chunk)
        if size > self._max:
            self.error = _too_large(self._max)
            raise self.error
        return size


class SSEDecoder(_LineDecoder):
    """Server-Sent Events (``text/event-stream``) parsed per the WHATWG spec.

    Each event's data is a ``{"prompt": piece}`` object, a JSON string or plain text.
    ``data: [DONE]`` ends the stream; ``event: error`` raises ``ServerStreamError``.
    ``last_event_id`` and ``retry_ms`` keep the ``id:`` and ``retry:`` fields for reconnects.
    ``max_buffer`` counts decoded characters of a partial line or of one event's data.
    """

    __slots__ = (
        "_data",
        "_data_len",
        "_decoder",
        "_event",
        "_id",
        "_partial",
        "_partial_len",
        "_skip_lf",
        "last_event_id",
        "retry_ms",
    )

    def __init__(self, *, require_done: bool = True, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        super().__init__(requires_terminator=require_done, max_buffer=max_buffer)
        # The stream is always UTF-8; "utf-8-sig" drops one leading BOM, even split up.
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")("replace")
        self._partial: list[str] = []
        self._partial_len = 0
        self._skip_lf = False  # the last chunk ended in CR: a leading LF completes CRLF
        self._data: list[str] = []
        self._data_len = 0
        self._event = ""
        self._id = ""
        self.last_event_id = ""
        self.retry_ms: int | None = None

    def feed(self, data: bytes) -> list[str]:
        """Decode one chunk; return the pieces of the events it completed."""
        if self.error is not None:
            raise self.error
        if self.terminated or not data:
            return []
        text = self._decoder.decode(data)
        if not text:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        has_cr = "\r" in text
        if not has_cr and "\n" not in text:
            self._partial_len = self._hold(self._partial, self._partial_len, text)
            return []
        if self._partial:
            text = "".join(self._partial) + text
            self._partial.clear()
            self._partial_len = 0
        if has_cr:
            lines = _LINE_END.split(text)
            self._skip_lf = text[-1] == "\r"
        else:
            lines = text.split("\n")
        rest = lines.pop()
        pieces = self._lines(lines)
        if rest and not self.terminated and self.error is None:
            self._partial_len = self._hold(self._partial, self._partial_len, rest)
        return pieces

    def finish(self) -> list[str]:
        """At EOF: a last ``[DONE]`` counts even without its line end. Without
        ``require_done``, a last event whose lines are complete but whose blank line never
        came is delivered (as openai-node does; the WHATWG parser drops it), and a half line
        raises ``StreamInterruptedError``. With ``require_done`` nothing more is delivered:
        the caller reports the missing ``[DONE]``.
        """
        if self.error is not None:
            raise self.error
        if self.terminated:
            return []
        # The held text never contains a line end, and flushing adds only U+FFFD.
        last = "".join(self._partial) + self._decoder.decode(b"", final=True)
        self._partial.clear()
        self._partial_len = 0
        if last and last[0] != ":":
            self._field(last)
        if self._data == ["[DONE]"] and self._event not in ("error", "ping"):
            self.terminated = True
            return []
        if self.requires_terminator:
            return []  # the caller reports the missing [DONE]
        if last:
            self.error = StreamInterruptedError(
                "stream ended in the middle of a line", ended_by="eof"
            )
            raise self.error
        return self._lines([""])  # the blank line that never came

    def _lines(self, lines: list[str]) -> list[str]:
        pieces: list[str] = []
        try:
            for line in lines:
                if line:
                    if line.startswith("data:"):  # the hot path, inlined from _field
                        value = line[6:] if line[5:6] == " " else line[5:]
                        self._data.append(value)
                        self._data_len += len(value) + 1
                        if self._data_len > self._max:
                            raise _too_large(self._max)
                    elif line[0] != ":":  # ":" starts a comment (keep-alive)
                        self._field(line)
                    continue
                piece = self._dispatch()
                if self.terminated:
                    break
                if piece:
                    pieces.append(piece)
        except ModalLLMError as exc:
            self.error = exc  # sticky: the stream is over
            if not pieces:
                raise
        return pieces

    def _field(self, line: str) -> None:
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_len += len(value) + 1
            if self._data_len > self._max:
                raise _too_large(self._max)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            # More digits than int() accepts raise ValueError: ignored like any bad value.
            with contextlib.suppress(ValueError):
                self.retry_ms = int(value)

    def _dispatch(self) -> str:
        """Handle a blank line: the event ends; return its piece ("" for none)."""
        self.last_event_id = self._id
        event, self._event = self._event, ""
        if not self._data:
            return ""
        lines = self._data
        data = lines[0] if len(lines) == 1 else "\n".join(lines)
        lines.clear()
        self._data_len = 0
        if event == "error":
            message = data
            if data[:1] in ("{", '"'):
                with contextlib.suppress(ValueError, RecursionError):
                    message = _server_message(_loads(data))
            raise _stream_error(message)
        if event == "ping":
            return ""
        if data == "[DONE]":
            self.terminated = True
            self._partial.clear()
            return ""
        # Only data that can start an object or a string is parsed: plain text stays cheap.
        if data[:1] in ("{", '"'):
            try:  # _loads inlined: this runs for every piece
                value, end = _scan_once(data, 0)
            except (StopIteration, ValueError, RecursionError):
                return data
            if end != len(data) and data[end:].strip(" \t\n\r"):
                return data
            if type(value) is dict:  # the usual {"prompt": "..."}: _piece_from_value's answer
                prompt = value.get("prompt")
                if type(prompt) is str and value.get("error") is None:
                    return prompt
            piece = _piece_from_value(value, data)
            return data if piece is None else piece
        return data


class NDJSONDecoder(_LineDecoder):
    """Newline-delimited JSON (``application/x-ndjson``, ``jsonl``, ``json-seq``).

    One ``{"prompt": piece}`` object or JSON string per line; blank lines are skipped and a
    line that is not JSON raises ``ContractError``. ``max_buffer`` counts bytes of one line.
    """

    __slots__ = ("_first", "_partial", "_partial_len")

    def __init__(self, *, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        super().__init__(requires_terminator=False, max_buffer=max_buffer)
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._first = True

    def feed(self, data: bytes) -> list[str]:
        """Decode one chunk; return the pieces of the lines it completed."""
        if self.error is not None:
            raise self.error
        if b"\n" not in data:
            if data:
                self._partial_len = self._hold(self._partial, self._partial_len, data)
            return []
        if self._partial:
            data = b"".join(self._partial) + data
            self._partial.clear()
            self._partial_len = 0
        lines = data.split(b"\n")
        rest = lines.pop()
        pieces = self._lines(lines)
        if rest and self.error is None:
            self._partial_len = self._hold(self._partial, self._partial_len, rest)
        return pieces

    def finish(self) -> list[str]:
        """At EOF: parse a last line that has no newline. One that is not JSON is a half
        line (the body was cut inside it): ``StreamInterruptedError``, as SSE's."""
        if self.error is not None:
            raise self.error
        line = b"".join(self._partial)
        self._partial.clear()
        self._partial_len = 0
        try:
            return self._lines([line])
        except ContractError as exc:
            if not str(exc.message).startswith(_NOT_JSON):
                raise
            self.error = StreamInterruptedError(
                "stream ended in the middle of a line", ended_by="eof"
            )
            raise self.error from None

    def _lines(self, lines: list[bytes]) -> list[str]:
        pieces: list[str] = []
        try:
            for raw in lines:
                if self._first and raw:
                    self._first = False
                    if raw.startswith(_UTF8_BOM):
                        raw = raw[3:]
                line = raw.strip(_NDJSON_STRIP)
                if line:
                    piece = self._piece(line)
                    if piece:
                        pieces.append(piece)
        except ModalLLMError as exc:
            self.error = exc  # sticky: the stream is over
            if not pieces:
                raise
        return pieces

    @staticmethod
    def _piece(line: bytes) -> str:
        text = line.decode("utf-8", "replace")
        try:
            value = _loads(text)
        except (ValueError, RecursionError):
            raise ContractError(_NOT_JSON, body=line) from None
        piece = _piece_from_value(value, line)
        if piece is None:
            raise ContractError("stream line is not a JSON object or string", body=line)
        return piece
