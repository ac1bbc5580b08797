"""Sans-IO decoders that turn a streamed reply body into text pieces.

One decoder per wire format of the streaming contract (SSE, NDJSON, plain text, one JSON
reply), picked by ``decoder_for(content_type)``. The client feeds network chunks in and
yields the pieces that come out; nothing here does I/O, so the decoders are tested as tables.

Errors the stream reports (``event: error``, ``{"error": ...}``, a bad ``"prompt"``) are
raised in order: pieces that precede the error in the same chunk are returned first, and the
error is raised by the next ``feed()`` or ``finish()`` call. So the pieces a caller sees never
depend on how the network split the body.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Protocol

from ._exceptions import ContractError, ModalLLMError, ReplyTooLargeError
from ._linedecoders import DEFAULT_MAX_BUFFER, NDJSON_TYPES, NDJSONDecoder, SSEDecoder

if TYPE_CHECKING:
    from ._models import Completion

__all__ = [
    "DEFAULT_MAX_BUFFER",
    "JSONDecoder",
    "NDJSONDecoder",
    "SSEDecoder",
    "StreamDecoder",
    "TextDecoder",
    "decoder_for",
    "refused_media_type",
]


class StreamDecoder(Protocol):
    """Turns the chunks of one reply body into text pieces (deltas that join to the text).

    Call ``feed()`` per chunk and ``finish()`` once at clean EOF. If ``requires_terminator``
    is true and ``terminated`` is still false after ``finish()``, the stream was cut short.
    An error found after some pieces of a chunk is raised by the next ``feed()``/``finish()``
    and shown at once in ``error``, so a caller can raise it right after those pieces.
    """

    requires_terminator: bool
    terminated: bool

    @property
    def error(self) -> ModalLLMError | None:
        """The error found in the stream so far (deferred behind earlier pieces), if any."""
        ...

    def feed(self, data: bytes) -> list[str]:
        """Decode one chunk; return the pieces it completed, in order (often none)."""
        ...

    def finish(self) -> list[str]:
        """At clean EOF, return the pieces still pending (a last line without newline...)."""
        ...


class TextDecoder:
    """Raw text (``text/plain``, other ``text/*``, and unknown types): each chunk's text.

    Decodes incrementally with the reply's charset (UTF-8 when absent or unknown), so a
    multibyte character split across chunks comes out whole. A leading UTF-8 BOM is dropped.
    """

    __slots__ = ("_decoder", "charset", "requires_terminator", "terminated")

    @property
    def error(self) -> ModalLLMError | None:
        return None  # whole-chunk formats raise at once; nothing is ever deferred

    def __init__(self, charset: str | None = None) -> None:
        self.requires_terminator = False
        self.terminated = False
        self.charset = _text_codec(charset)
        self._decoder = codecs.getincrementaldecoder(self.charset)("replace")

    def feed(self, data: bytes) -> list[str]:
        """Return the text this chunk completes (a split character waits for the next)."""
        text = self._decode(data, final=False)
        return [text] if text else []

    def finish(self) -> list[str]:
        """At EOF: flush the decoder (an incomplete character becomes U+FFFD)."""
        text = self._decode(b"", final=True)
        return [text] if text else []

    def _decode(self, data: bytes, *, final: bool) -> str:
        try:
            return self._decoder.decode(data, final)
        except ValueError:  # UnicodeError from a codec that rejects errors="replace"
            raise ContractError(f"reply cannot be decoded as {self.charset}", body=data) from None


# Python codecs that are no charset, and whose incremental decoders give a different text
# depending on where the chunks split (an octal escape, a punycode label): read as unknown.
_NOT_CHARSETS = frozenset({"punycode", "unicode-escape"})


def _text_codec(charset: str | None) -> str:
    """The Python codec for a charset: utf-8-sig for UTF-8 and for unknown or non-text ones."""
    if not charset:
        return "utf-8-sig"
    try:
        name = codecs.lookup(charset).name
        "".encode(name)  # refuses bytes-to-bytes codecs such as "hex"
    except (LookupError, ValueError):
        return "utf-8-sig"
    return "utf-8-sig" if name == "utf-8" or name in _NOT_CHARSETS else name


class JSONDecoder:
    """A non-streaming ``application/json`` reply: the whole ``"prompt"`` is one piece.

    The body is buffered (up to ``max_buffer`` bytes) and parsed at ``finish()`` with
    ``parse_reply``; ``completion`` then holds the full reply, extra keys included.
    """

    __slots__ = ("_max", "_parts", "_size", "completion", "requires_terminator", "terminated")

    @property
    def error(self) -> ModalLLMError | None:
        return None  # whole-chunk formats raise at once; nothing is ever deferred

    def __init__(self, *, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.requires_terminator = False
        self.terminated = False
        self.completion: Completion | None = None
        self._max = max_buffer
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[str]:
        """Buffer one chunk; a JSON reply yields nothing until EOF."""
        if data:
            self._size += len(data)
            if self._size > self._max:
                raise ReplyTooLargeError(f"reply is larger than {self._max} bytes")
            self._parts.append(data)
        return []

    def finish(self) -> list[str]:
        """Parse the body; return its text as one piece (none if empty)."""
        from ._models import parse_reply  # pydantic loads on first use, not on import

        self.completion = parse_reply(b"".join(self._parts))
        self._parts.clear()
        text = self.completion.text
        return [text] if text else []


def _parse_content_type(content_type: str | None) -> tuple[str, str | None]:
    """``'Text/Plain; Charset="latin-1"'`` -> ``("text/plain", "latin-1")``."""
    if not content_type:
        return "", None
    media, _, params = content_type.partition(";")
    charset = None
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip("\"'") or None
    return media.strip().lower(), charset


_REFUSED_TYPES = frozenset({"text/html", "application/xhtml+xml"})


def refused_media_type(content_type: str | None) -> str | None:
    """The media type of a 2xx reply that cannot be an answer, or ``None`` if it may be.

    The one content-type rule of both ``generate()`` and ``stream()``: an HTML page (a
    login wall, a proxy's error page, a web app at the wrong URL) is never the generated
    text, so it is refused with ``ContractError`` instead of being parsed or yielded.
    """
    if not content_type or "htm" not in content_type.lower():
        return None
    media = content_type.partition(";")[0].strip().lower()
    return media if media in _REFUSED_TYPES else None


def decoder_for(
    content_type: str | None,
    *,
    require_done: bool = True,
    max_buffer: int = DEFAULT_MAX_BUFFER,
) -> StreamDecoder:
    """Pick the decoder for a reply's ``Content-Type`` (case and parameters ignored).

    ``text/event-stream`` -> SSE (always UTF-8), NDJSON types -> NDJSON, ``application/json``
    and ``+json`` -> one JSON reply, ``text/*`` -> text. A missing or unknown type is read as
    text, honouring its charset: whatever the server sent reaches the caller, never dropped.
    (HTML never gets here: see ``refused_media_type``.)
    ``require_done`` says whether an SSE stream must end with ``data: [DONE]``.
    """
    media, charset = _parse_content_type(content_type)
    if media == "text/event-stream":
        return SSEDecoder(require_done=require_done, max_buffer=max_buffer)
    if media in NDJSON_TYPES:
        return NDJSONDecoder(max_buffer=max_buffer)
    if media in ("application/json", "text/json") or media.endswith("+json"):
        return JSONDecoder(max_buffer=max_buffer)
    return TextDecoder(charset)
