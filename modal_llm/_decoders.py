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
from typing import TYPE_CHECKING, Final, Protocol

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
    "html_page_error",
    "looks_like_html",
    "refusal_message",
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
    error: ModalLLMError | None
    """The error found in the stream so far (deferred behind earlier pieces), if any."""

    def feed(self, data: bytes) -> list[str]:
        """Decode one chunk; return the pieces it completed, in order (often none)."""
        ...

    def finish(self) -> list[str]:
        """At clean EOF, return the pieces still pending (a last line without newline...)."""
        ...


class TextDecoder:
    """Raw text (``text/*`` other than HTML, or no type): each chunk's text.

    Decodes incrementally with the reply's charset (UTF-8 when absent or unknown), so a
    multibyte character split across chunks comes out whole. A leading UTF-8 BOM is dropped.
    A body that starts as an HTML document (``<!doctype html``, ``<html``) raises
    ``ContractError``: the content-type rule's check on the body (``looks_like_html``).
    """

    __slots__ = (
        "_content_type",
        "_decoder",
        "_head",
        "charset",
        "requires_terminator",
        "terminated",
    )

    error: ModalLLMError | None = None  # whole-chunk formats raise at once: never deferred

    def __init__(self, charset: str | None = None, content_type: str | None = None) -> None:
        self.requires_terminator = False
        self.terminated = False
        self.charset = _text_codec(charset)
        self._decoder = codecs.getincrementaldecoder(self.charset)("replace")
        self._content_type = content_type
        self._head: bytes | None = b""  # the body's start until it is known not to be HTML

    def feed(self, data: bytes) -> list[str]:
        """Return the text this chunk completes (a split character waits for the next)."""
        if self._head is not None:
            data = self._sniff(self._head + data, final=False)
        text = self._decode(data, final=False)
        return [text] if text else []

    def finish(self) -> list[str]:
        """At EOF: flush the decoder (an incomplete character becomes U+FFFD)."""
        data = b""
        if self._head is not None:
            data = self._sniff(self._head, final=True)
        text = self._decode(data, final=True)
        return [text] if text else []

    def _sniff(self, head: bytes, *, final: bool) -> bytes:
        """Hold the body's first bytes until ``looks_like_html`` can tell; raise if HTML."""
        html = looks_like_html(head)
        if html is None and not final:
            self._head = head
            return b""
        self._head = None
        if html:
            raise html_page_error(self._content_type, head)
        return head

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

    error: ModalLLMError | None = None  # whole-chunk formats raise at once: never deferred

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


HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
_JSON_TYPES: Final = frozenset({"application/json", "text/json"})
_decisions: dict[str, str | None] = {}  # Content-Type header -> refused media type or None


def refused_media_type(content_type: str | None) -> str | None:
    """The media type of a 2xx reply that cannot be an answer, or ``None`` if it may be.

    The one content-type rule of both ``generate()`` and ``stream()`` (and 303 polls),
    applied by the send path before either reads the body. Accepted: the contract's formats
    (``application/json`` and ``+json``, ``text/event-stream``, the NDJSON types, ``text/*``)
    and a missing type. Refused: an HTML page (``text/html``, XHTML: a login wall, a proxy's
    error page, a web app at the wrong URL) and every other type (``application/xml``,
    ``application/octet-stream``, images...), which no contract endpoint sends. An HTML
    document sent as ``text/*`` or without a type is caught by ``looks_like_html`` on the
    body. Decisions are cached per header value (a service sees a handful).
    """
    if content_type is None:
        return None
    try:
        return _decisions[content_type]
    except KeyError:
        pass
    media, _ = _parse_content_type(content_type)
    refused: str | None = media
    if media in HTML_TYPES:
        refused = media
    elif (
        not media
        or media in _JSON_TYPES
        or media.endswith("+json")
        or media in NDJSON_TYPES
        or (media.startswith("text/") and len(media) > 5)
    ):
        refused = None
    if len(_decisions) < 256:
        _decisions[content_type] = refused
    return refused


def refusal_message(media: str, *, html: bool = False) -> str:
    """What ``ContractError`` says of a reply refused by the content-type rule."""
    if html or media in HTML_TYPES:
        return (
            f"the endpoint answered with an HTML page ({media}), not an answer of the "
            "contract; is the URL the endpoint's?"
        )
    return (
        f"the endpoint answered with {media}, none of the contract's formats (JSON, SSE, "
        "NDJSON, text); is the URL the endpoint's?"
    )


_HTML_STARTS: Final = (b"<!doctype html", b"<html")
_SNIFF_BYTES: Final = len(_HTML_STARTS[0])


def looks_like_html(start: bytes) -> bool | None:
    """Whether a body that begins with ``start`` is an HTML document (``<!doctype html``
    or ``<html``, after a BOM and whitespace, any case); ``None`` while ``start`` is too
    short to tell."""
    head = start.removeprefix(b"\xef\xbb\xbf").lstrip()[:_SNIFF_BYTES].lower()
    if any(head.startswith(mark) for mark in _HTML_STARTS):
        return True
    if any(mark.startswith(head) for mark in _HTML_STARTS):
        return None  # a prefix of a mark (or empty): more bytes decide
    return False


def html_page_error(content_type: str | None, body: bytes) -> ContractError:
    """The ``ContractError`` for an HTML document sent as text or without a type."""
    media = _parse_content_type(content_type)[0]
    sent = f"sent as {media}" if media else "sent without a Content-Type"
    return ContractError(refusal_message(sent, html=True), body=body)


def decoder_for(
    content_type: str | None,
    *,
    require_done: bool = True,
    max_buffer: int = DEFAULT_MAX_BUFFER,
) -> StreamDecoder:
    """Pick the decoder for a reply's ``Content-Type`` (case and parameters ignored).

    ``text/event-stream`` -> SSE (always UTF-8), NDJSON types -> NDJSON, ``application/json``
    and ``+json`` -> one JSON reply, ``text/*`` and a missing type -> text, honouring its
    charset. (Other types never get here: see ``refused_media_type``; an unknown type
    given anyway is read as text.)
    ``require_done`` says whether an SSE stream must end with ``data: [DONE]``.
    """
    media, charset = _parse_content_type(content_type)
    if media == "text/event-stream":
        return SSEDecoder(require_done=require_done, max_buffer=max_buffer)
    if media in NDJSON_TYPES:
        return NDJSONDecoder(max_buffer=max_buffer)
    if media in _JSON_TYPES or media.endswith("+json"):
        return JSONDecoder(max_buffer=max_buffer)
    return TextDecoder(charset, content_type)
