"""Fuzzing: the reply parser, every stream decoder, and the client against arbitrary replies.

The only exceptions that may reach a caller are ``ModalLLMError`` subclasses: never a bare
``KeyError``, ``JSONDecodeError``, ``UnicodeDecodeError``, ``ValueError`` or aiohttp error,
and never a hang. This complements ``test_decoders.py`` (fixed content types, SSE chunking)
with arbitrary content types and charsets, chunking invariance for every decoder, one text
through every wire format, and a raw TCP server that answers with arbitrary bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from modal_llm import (
    DEFAULT_MAX_CONCURRENCY,
    AsyncClient,
    ContractError,
    EndpointTimeoutError,
    ModalLLMError,
    RedirectError,
    ReplyTooLargeError,
    RetryPolicy,
    Timeout,
)
from modal_llm._call import Reply as WholeReply
from modal_llm._decoders import (
    DEFAULT_MAX_BUFFER,
    JSONDecoder,
    NDJSONDecoder,
    SSEDecoder,
    StreamDecoder,
    TextDecoder,
    decoder_for,
)
from modal_llm._exceptions import redact_url
from modal_llm._models import parse_reply
from modal_llm._unary import completion_of, text_of
from modal_llm.server._script import abort_with_rst

from .conftest import MakeEndpoint
from .strategies import cut_points, line_text, wire_bytes

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(max_examples=150, deadline=None)

# -- helpers ------------------------------------------------------------------------------------


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    """``data`` cut at ``points`` (taken modulo its length): any chunking of one body."""
    cuts = sorted({p % (len(data) + 1) for p in points})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


Outcome = tuple[list[str], bool, type[ModalLLMError] | None]


def outcome(decoder: StreamDecoder, chunks: Iterable[bytes]) -> Outcome:
    """Pieces until the first error, whether the stream terminated, and that error's type.

    Any exception that is not a ``ModalLLMError`` propagates and fails the test.
    """
    pieces: list[str] = []
    try:
        for chunk in chunks:
            pieces += decoder.feed(chunk)
        pieces += decoder.finish()
    except ModalLLMError as exc:
        str(exc)  # rendering the message must not fail either
        return pieces, decoder.terminated, type(exc)
    return pieces, decoder.terminated, None


_points = cut_points(16)
_bytes = wire_bytes(300, 60)

# -- parse_reply ----------------------------------------------------------------------------------

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8")),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=12,
)
_replyish = st.one_of(
    _json_values,
    st.dictionaries(st.text(max_size=8), _json_values, max_size=4).flatmap(
        lambda extra: st.builds(lambda prompt: {**extra, "prompt": prompt}, _json_values)
    ),
)


@FUZZ
@given(
    body=_bytes,
    status=st.one_of(st.none(), st.integers(100, 999)),
    secret=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=16),
)
def test_parse_reply_raises_only_contract_error(
    body: bytes, status: int | None, secret: str
) -> None:
    url = f"http://127.0.0.1:8000/gen?token={secret}&__modal_function_call_id=fc-1"
    try:
        completion = parse_reply(body, status_code=status, url=url)
    except ContractError as exc:
        error = exc
    else:
        assert isinstance(completion.text, str)
        assert completion.data["prompt"] == completion.text
        return
    assert secret not in str(error) and secret not in repr(error)
    assert error.status_code == status


@FUZZ
@given(
    value=_replyish,
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
    padding=st.sampled_from(["", " ", "\n", "\r\n\t "]),
)
def test_parse_reply_agrees_with_the_json_module(
    value: Any, ensure_ascii: bool, indent: int | None, padding: str
) -> None:
    """A reply parses iff it is an object whose "prompt" is a string; every key survives."""
    body = (
        padding + json.dumps(value, ensure_ascii=ensure_ascii, indent=indent) + padding
    ).encode()
    valid = isinstance(value, dict) and isinstance(value.get("prompt"), str)
    try:
        completion = parse_reply(body, status_code=200)
    except ContractError as exc:
        error = exc
    else:
        assert valid
        assert completion.text == value["prompt"]
        assert completion.data == value
        return
    assert not valid, f"valid reply rejected: {error}"
    if not isinstance(value, dict):
        assert "not a JSON object" in str(error)
    elif "prompt" not in value:
        assert 'no "prompt" key' in str(error)
    else:
        assert '"prompt" is not a string' in str(error)


def _outcome(parse: Any, body: bytes) -> tuple[str, object]:
    try:
        text = parse(WholeReply(200, body, "http://h/", "application/json"))
    except ContractError as exc:
        return "error", (str(exc), exc.status_code, exc.body_excerpt)
    return "text", text if isinstance(text, str) else text.text


@FUZZ
@given(body=_bytes)
def test_reply_text_agrees_with_parse_reply_on_any_bytes(body: bytes) -> None:
    """``generate``'s text-only parse accepts what the model accepts, with the same errors."""
    assert _outcome(text_of, body) == _outcome(completion_of, body)


@FUZZ
@given(value=_replyish, padding=st.sampled_from(["", " ", "\n", "\ufeff"]))
def test_reply_text_agrees_with_parse_reply_on_replies(value: Any, padding: str) -> None:
    body = (padding + json.dumps(value) + padding.strip("\ufeff")).encode()
    assert _outcome(text_of, body) == _outcome(completion_of, body)
    for odd in (b'{"prompt": "a", "n": NaN}', b'{"prompt": "a", "prompt": 1}', b"\xef\xbb\xbf[]"):
        assert _outcome(text_of, odd) == _outcome(completion_of, odd)


def test_parse_reply_lone_surrogate_and_bom_are_typed() -> None:
    """Found while fuzzing: pydantic's parser rejects these where ``json`` would not."""
    for body in (b'{"prompt": "\\ud800"}', b'{"prompt": "\xff"}'):
        with pytest.raises(ContractError, match="not valid JSON"):
            parse_reply(body)
    # A leading BOM is dropped, as every stream decoder does (issue 10, fault 6).
    assert parse_reply(b'\xef\xbb\xbf{"prompt": "a"}').text == "a"


# -- decoders: arbitrary content types ------------------------------------------------------------

_MEDIA = [
    "text/event-stream",
    "TEXT/EVENT-STREAM",
    "application/x-ndjson",
    "application/jsonl",
    "application/json-seq",
    "application/json",
    "Application/JSON",
    "application/problem+json",
    "text/json",
    "text/plain",
    "text/html",
    "application/octet-stream",
    "multipart/mixed",
    "",
    "/",
    "text/",
    ";",
]
_CHARSETS = [
    "utf-8",
    "UTF-8",
    "utf8",
    "utf-16",
    "utf-16-be",
    "utf-32",
    "latin-1",
    "cp1252",
    "shift_jis",
    "gb18030",
    "iso-2022-jp",
    "utf-7",
    "idna",
    "punycode",
    "undefined",
    "hex",
    "rot13",
    "base64",
    "zlib",
    "bogus-charset",
    "",
    "\x00",
    '"utf-16"',
    "'latin-1'",
]
_param_text = line_text


@st.composite
def content_types(draw: st.DrawFn) -> str | None:
    """Real media types with arbitrary parameters and charsets, or arbitrary text."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.one_of(st.none(), _param_text))
    media = draw(st.sampled_from(_MEDIA))
    params = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["charset", "Charset", "CHARSET", "boundary", "q", ""]))
        value = draw(st.one_of(st.sampled_from(_CHARSETS), _param_text))
        params.append(f"{name}={value}" if draw(st.booleans()) else name)
    sep = draw(st.sampled_from([";", "; ", " ;", ";;"]))
    return sep.join([media, *params]) if params else media


@FUZZ
@given(
    content_type=content_types(),
    body=_bytes,
    points=_points,
    require_done=st.booleans(),
    max_buffer=st.sampled_from([1, 16, DEFAULT_MAX_BUFFER]),
)
def test_any_content_type_and_any_bytes_give_only_typed_errors(
    content_type: str | None,
    body: bytes,
    points: list[int],
    require_done: bool,
    max_buffer: int,
) -> None:
    decoder = decoder_for(content_type, require_done=require_done, max_buffer=max_buffer)
    pieces, _, error = outcome(decoder, split_at(body, points))
    assert all(isinstance(piece, str) and piece for piece in pieces)
    if error is None:
        assert decoder.error is None


@FUZZ
@given(content_type=content_types(), body=_bytes, points=_points)
def test_chunking_never_changes_the_outcome_of_any_decoder(
    content_type: str | None, body: bytes, points: list[int]
) -> None:
    """Pieces, termination and error type do not depend on how the bytes arrive.

    Text pieces follow the network chunks by design, so for text only their join counts.
    """
    whole = decoder_for(content_type)
    split = decoder_for(content_type)
    expected = outcome(whole, [body])
    got = outcome(split, split_at(body, points))
    if isinstance(whole, TextDecoder):
        assert ("".join(got[0]), got[1:]) == ("".join(expected[0]), expected[1:])
    else:
        assert got == expected


# -- decoders: one valid stream, every format, any chunking ---------------------------------------

_piece_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=10)


def _sse(pieces: list[str], eol: str) -> bytes:
    events = "".join(f"data: {json.dumps({'prompt': p})}{eol}{eol}" for p in pieces)
    return (events + f"data: [DONE]{eol}{eol}").encode()


def _ndjson(pieces: list[str], eol: str, record_separator: bool) -> bytes:
    prefix = "\x1e" if record_separator else ""
    return "".join(prefix + json.dumps({"prompt": p}) + eol for p in pieces).encode()


@FUZZ
@given(
    pieces=st.lists(_piece_text, min_size=1, max_size=6),
    eol=st.sampled_from(["\n", "\r\n"]),
    points=_points,
    charset=st.sampled_from(["utf-8", "utf-16", "utf-32", "gb18030"]),
)
def test_one_text_through_every_format_and_any_chunking_decodes_the_same(
    pieces: list[str], eol: str, points: list[int], charset: str
) -> None:
    text = "".join(pieces)
    assume(charset != "utf-8" or not text.startswith("\ufeff"))  # a leading BOM is dropped
    bodies: list[tuple[str, bytes, list[str] | None]] = [
        ("Text/Event-Stream; charset=UTF-8", _sse(pieces, eol), pieces),
        ("text/event-stream", _sse(pieces, eol), pieces),
        ("application/x-ndjson", _ndjson(pieces, eol, False), pieces),
        ("application/jsonl; charset=utf-8", _ndjson(pieces, eol, False), pieces),
        ("application/json-seq", _ndjson(pieces, eol, True), pieces),
        ("application/json", json.dumps({"prompt": text, "usage": {}}).encode(), [text]),
        ("application/vnd.modal+json", json.dumps({"prompt": text}).encode(), [text]),
        (f"text/plain; charset={charset}", text.encode(charset), None),
    ]
    for content_type, body, expected in bodies:
        decoded, terminated, error = outcome(decoder_for(content_type), split_at(body, points))
        assert error is None, content_type
        assert "".join(decoded) == text, content_type
        if expected is not None:
            assert decoded == expected, content_type
        if content_type.lower().startswith("text/event-stream"):
            assert terminated


# -- decoders: bounded memory ---------------------------------------------------------------------


@FUZZ
@given(
    kind=st.sampled_from(["sse", "ndjson", "json"]),
    limit=st.integers(1, 64),
    size=st.integers(1, 200),
    points=_points,
)
def test_a_body_without_breaks_is_refused_once_it_outgrows_the_buffer(
    kind: str, limit: int, size: int, points: list[int]
) -> None:
    """SSE and NDJSON hold at most one line, JSON one body: never more than ``max_buffer``."""
    decoder: StreamDecoder
    if kind == "sse":
        decoder = SSEDecoder(max_buffer=limit)
    elif kind == "ndjson":
        decoder = NDJSONDecoder(max_buffer=limit)
    else:
        decoder = JSONDecoder(max_buffer=limit)
    body = b"x" * size  # ASCII: characters and bytes count the same
    fed = 0
    try:
        for chunk in split_at(body, points):
            fed += len(chunk)
            decoder.feed(chunk)
            assert fed <= limit, "held more than max_buffer without refusing"
    except ReplyTooLargeError:
        assert fed > limit
        return
    assert size <= limit


# -- the client against arbitrary replies ---------------------------------------------------------

SELF = b"{SELF}"
"""Placeholder in generated replies for this server's own origin (``http://127.0.0.1:PORT``)."""

_LOCATIONS = [
    "/result?__modal_function_call_id=fc-1",
    "result",
    "?__modal_function_call_id=fc-2",
    "{SELF}/other",
    "{SELF}/r?__modal_function_call_id=fc-3&token=x",
    "http://127.0.0.1:9/refused",
    "http://[::1",
    "//[",
    "http://127.0.0.1:99999/",
    "http://127.0.0.1:abc/",
    "http://127.0.0.1:+80/",
    "http://127.0.0.1:9\\@127.0.0.1:1/",
    "ftp://127.0.0.1/",
    "javascript:alert(1)",
    "data:text/plain,hi",
    "",
    " ",
    "\x00",
    "/\\\\x",
    "#frag",
]
_RETRY_AFTER = [
    "0",
    "0.01",
    "1",
    "-1",
    "nan",
    "inf",
    "1e400",
    "soon",
    "",
    "Wed, 21 Oct 2015 07:28:00 GMT",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Mon, 01 Jan 0001 00:00:00 -0000",
]
_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789", min_size=1, max_size=12)
_printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
_noisy_value = st.one_of(
    st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=20),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=8),
)


@dataclass
class Reply:
    """What the raw server sends for one request, and how it ends the exchange."""

    raw: bytes
    ending: str  # close | rst | hang | keep
    expected: str | None = None  # the text a correct client returns (for valid replies)
    note: str = ""


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out = bytearray()
    for part in split_at(body, sizes):
        if part:
            out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


def _head(status_line: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return status_line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"


@st.composite
def valid_replies(draw: st.DrawFn, op: str) -> Reply:
    """A well-formed reply the client must decode to exactly ``expected``."""
    text = draw(st.text(alphabet=st.characters(codec="utf-8"), max_size=20))
    headers: list[tuple[bytes, bytes]] = []
    fmt = draw(st.sampled_from(["json", "sse", "ndjson"])) if op == "stream" else "json"
    if fmt == "json":
        body = json.dumps({"prompt": text, "usage": {"n": 1}}).encode()
        headers.append((b"Content-Type", b"application/json"))
    elif fmt == "sse":
        body = _sse([text] if text else [], "\n")
        headers.append((b"Content-Type", b"text/event-stream"))
    else:
        body = _ndjson([text] if text else [], "\n", False)
        headers.append((b"Content-Type", b"application/x-ndjson"))
    encoding = draw(st.sampled_from(["identity", "gzip", "deflate"]))
    if encoding == "gzip":
        body = gzip.compress(body)
        headers.append((b"Content-Encoding", b"gzip"))
    elif encoding == "deflate":
        body = zlib.compress(body)
        headers.append((b"Content-Encoding", b"deflate"))
    if draw(st.booleans()):
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = _chunked(body, draw(_points))
    else:
        headers.append((b"Content-Length", str(len(body)).encode()))
    ending = draw(st.sampled_from(["close", "keep"]))
    if ending == "close":
        headers.append((b"Connection", b"close"))
    raw = _head(b"HTTP/1.1 200 OK", headers) + body
    return Reply(raw, ending, expected=text, note=f"valid {fmt} {encoding}")


@st.composite
def arbitrary_replies(draw: st.DrawFn) -> Reply:
    """Any status, headers and body; possibly truncated; possibly not HTTP at all."""
    if draw(st.integers(0, 9)) == 0:
        return Reply(draw(_bytes), draw(st.sampled_from(["close", "rst", "hang"])), note="garbage")
    status = draw(
        st.one_of(
            st.sampled_from([200, 204, 301, 302, 303, 307, 308, 401, 404, 422, 429, 500, 503]),
            st.integers(100, 999),
        )
    )
    # Mostly well-formed HTTP, so that replies get past aiohttp's parser to our code.
    noisy = draw(st.integers(0, 3)) == 0
    header_value = _noisy_value if noisy else _printable
    versions = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 "] if noisy else [b"HTTP/1.1"]
    version = draw(st.sampled_from(versions))
    reason = draw(header_value)
    status_line = version + b" " + str(status).encode() + b" " + reason.encode()
    body = draw(
        st.one_of(
            _bytes,
            _replyish.map(lambda v: json.dumps(v).encode()),
            st.just(json.dumps({"prompt": "ok"}).encode()),
        )
    )
    headers: list[tuple[bytes, bytes]] = []
    options = draw(
        st.lists(
            st.sampled_from(
                [
                    "type",
                    "length",
                    "bad-length",
                    "chunked",
                    "encoding",
                    "location",
                    "retry-after",
                    "retry-after-ms",
                    "connection",
                    "other",
                ]
            ),
            max_size=6,
        )
    )
    for option in options:
        if option == "type":
            value = draw(st.one_of(content_types(), st.none())) or ""
            headers.append((b"Content-Type", value.encode()))
        elif option == "length":
            headers.append((b"Content-Length", str(len(body)).encode()))
        elif option == "bad-length":
            bad = draw(st.one_of(st.integers(-5, 10**15).map(str), header_value))
            headers.append((b"Content-Length", bad.encode()))
        elif option == "chunked":
            headers.append((b"Transfer-Encoding", b"chunked"))
            if draw(st.booleans()):
                body = _chunked(body, draw(_points))
        elif option == "encoding":
            name = draw(st.sampled_from(["gzip", "deflate", "br", "zstd", "bogus", "gzip, gzip"]))
            headers.append((b"Content-Encoding", name.encode()))
            if name == "gzip" and draw(st.booleans()):
                body = gzip.compress(body)
        elif option == "location":
            headers.append((b"Location", draw(st.sampled_from(_LOCATIONS)).encode()))
        elif option == "retry-after":
            value = draw(st.one_of(st.sampled_from(_RETRY_AFTER), header_value))
            headers.append((b"Retry-After", value.encode()))
        elif option == "retry-after-ms":
            value = draw(st.one_of(st.sampled_from(_RETRY_AFTER), header_value))
            headers.append((b"retry-after-ms", value.encode()))
        elif option == "connection":
            value = draw(st.sampled_from(["close", "keep-alive", "upgrade", "bogus"]))
            headers.append((b"Connection", value.encode()))
        else:
            headers.append((draw(_token).encode(), draw(header_value).encode()))
    raw = _head(status_line, headers) + body
    if draw(st.integers(0, 3)) == 0:
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    ending = draw(st.sampled_from(["close", "close", "close", "keep", "rst", "hang"]))
    if 100 <= status < 200 and status != 101:
        # aiohttp waits for the final reply after an interim one with no read timer:
        # a stall there is a known hang (test_interim_reply_then_stall_is_bounded).
        ending = "close"
    return Reply(raw, ending, note=f"status {status} {options}")


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, Reply]:
    op = draw(st.sampled_from(["generate", "complete", "stream"]))
    if draw(st.integers(0, 4)) == 0:
        return op, draw(valid_replies(op))
    return op, draw(arbitrary_replies())


async def _read_request(reader: asyncio.StreamReader) -> bool:
    """Read one request (head and Content-Length body); False at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if match:
        await reader.readexactly(int(match.group(1)))
    return True


@dataclass
class RawServer:
    """A TCP server on 127.0.0.1 that answers every request with ``reply``, byte for byte."""

    reply: Reply = field(default_factory=lambda: Reply(b"", "close"))
    requests: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/gen"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await _read_request(reader):
                self.requests += 1
                reply = self.reply
                writer.write(reply.raw.replace(SELF, f"http://127.0.0.1:{self.port}".encode()))
                await writer.drain()
                if reply.ending == "keep":
                    continue
                if reply.ending == "hang":
                    await asyncio.wait_for(reader.read(), 10)  # until the client gives up
                elif reply.ending == "rst":
                    abort_with_rst(writer.transport)
                break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.TimeoutError:
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


FUZZ_CONCURRENCY = 2
HANG_LIMIT = 10.0
"""A call still running after this long is a hang: every timeout below is far shorter."""


@dataclass
class FuzzRig:
    """One loop, one raw server and one client, shared by every hypothesis example."""

    loop: asyncio.AbstractEventLoop
    server: RawServer
    client: AsyncClient


@pytest.fixture
def rig() -> Iterator[FuzzRig]:
    loop = asyncio.new_event_loop()
    server = RawServer()
    loop.run_until_complete(server.start())

    async def open_client() -> AsyncClient:
        client = AsyncClient(
            server.url,
            max_concurrency=FUZZ_CONCURRENCY,
            retry=RetryPolicy(
                max_retries=1, wait_initial=0, wait_max=0, jitter=0, max_retry_after=0.05
            ),
            timeout=Timeout(0.2),  # no deadline: a hang must show as one
            max_redirects=2,
            max_reply_bytes=4096,
        )
        return await client.__aenter__()

    client = loop.run_until_complete(open_client())
    try:
        yield FuzzRig(loop, server, client)
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(server.stop())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _call(client: AsyncClient, op: str) -> str:
    if op == "generate":
        return await client.generate("fuzz me")
    if op == "complete":
        return (await client.complete("fuzz me")).text
    return "".join([piece async for piece in client.stream("fuzz me")])


def assert_healthy(client: AsyncClient, concurrency: int = FUZZ_CONCURRENCY) -> None:
    """Every concurrency slot and every pooled connection is back."""
    pool = client.pool
    assert (pool.max_concurrency, pool.slots_in_use, pool.connections_in_use) == (concurrency, 0, 0)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=cases())
def test_client_against_arbitrary_replies(rig: FuzzRig, case: tuple[str, Reply]) -> None:
    op, reply = case
    rig.server.reply = reply
    error: ModalLLMError | None = None
    try:
        text = rig.loop.run_until_complete(asyncio.wait_for(_call(rig.client, op), HANG_LIMIT))
    except ModalLLMError as exc:
        error = exc
    except asyncio.TimeoutError:  # after ModalLLMError: EndpointTimeoutError is one too
        pytest.fail(f"{op} hung on {reply.note}: {reply.raw[:200]!r}")
    if error is not None:
        event(f"{op}: {type(error).__name__}")
        assert "token=x" not in str(error) + repr(error)  # query values are redacted
        assert reply.expected is None, f"valid reply ({reply.note}) failed: {error!r}"
    else:
        event(f"{op}: text")
        assert isinstance(text, str)
        if reply.expected is not None:
            assert text == reply.expected
    assert_healthy(rig.client)


# -- regressions found by the fuzzer --------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    ["http://[::1", "//[", "http://127.0.0.1:99999/", "http://127.0.0.1:abc/", "http://h:+80/"],
)
async def test_malformed_location_is_a_redirect_error(
    make_endpoint: MakeEndpoint, location: str
) -> None:
    """urljoin/urlsplit raise ValueError on these; it used to escape bare from the client."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=303, headers={"Location": location})

    async with AsyncClient(await make_endpoint(handler), max_retries=0) as client:
        with pytest.raises(RedirectError, match="malformed"):
            await client.generate("hi")
        with pytest.raises(RedirectError, match="malformed"):
            async for _ in client.stream("hi"):
                pass


@pytest.mark.parametrize(
    "url", ["http://h:99999/x", "http://h:abc/", "http://[::1", "http://h:-1/"]
)
def test_redact_url_never_raises(url: str) -> None:
    """``redact_url`` read ``.port`` outside its guard: a bad port raised ValueError."""
    assert redact_url(url) == "<invalid url>"
    assert ModalLLMError("boom", url=url).url == "<invalid url>"


INTERIM = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


async def test_interim_reply_then_stall_is_bounded() -> None:
    # aiohttp drops its sock_read timer after a 1xx interim reply; the unary path
    # bounds the whole exchange with one timer, so a stall after 1xx still times out.
    server = RawServer(Reply(INTERIM, "hang"))
    await server.start()
    try:
        async with AsyncClient(server.url, timeout=Timeout(0.2), max_retries=0) as client:
            with pytest.raises(EndpointTimeoutError):
                await asyncio.wait_for(client.generate("hi"), 1.0)
    finally:
        await server.stop()


async def test_interim_reply_then_stall_is_bounded_by_the_deadline() -> None:
    server = RawServer(Reply(INTERIM, "hang"))
    await server.start()
    try:
        # Phase timeouts past the deadline: only the deadline can end this (a shorter
        # first_byte would, rightly, end it first as a first_byte timeout: review R6).
        timeout = Timeout(HANG_LIMIT / 2, deadline=0.5)
        async with AsyncClient(server.url, timeout=timeout, max_retries=0) as client:
            with pytest.raises(EndpointTimeoutError) as info:
                await asyncio.wait_for(client.generate("hi"), HANG_LIMIT)
            assert info.value.phase == "deadline"
            with pytest.raises(EndpointTimeoutError):  # before the first piece: no partial
                await asyncio.wait_for(_call(client, "stream"), HANG_LIMIT)
            assert_healthy(client, concurrency=DEFAULT_MAX_CONCURRENCY)
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("charset", "body", "cut"),
    [("punycode", b"ab", 1), ("punycode", b"ux-0nn\\", 2), ("unicode_escape", b"2\\023b3-", 4)],
)
def test_codecs_whose_text_depends_on_chunking_are_read_as_utf8(
    charset: str, body: bytes, cut: int
) -> None:
    """Found by fuzzing: these Python codecs (no charset anyway) decode a split body to
    another text than the whole one; they are treated like an unknown charset now."""
    whole = decoder_for(f"text/plain; charset={charset}")
    split = decoder_for(f"text/plain; charset={charset}")
    assert isinstance(whole, TextDecoder) and whole.charset == "utf-8-sig"
    expected = outcome(whole, [body])
    got = outcome(split, [body[:cut], body[cut:]])
    assert "".join(got[0]) == "".join(expected[0]) == body.decode()
