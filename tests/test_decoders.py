"""Tables and properties for the sans-IO stream decoders (no HTTP here: bytes in, pieces out)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modal_llm._decoders import (
    DEFAULT_MAX_BUFFER,
    JSONDecoder,
    NDJSONDecoder,
    SSEDecoder,
    StreamDecoder,
    TextDecoder,
    decoder_for,
    refused_media_type,
)
from modal_llm._exceptions import (
    ContractError,
    ModalLLMError,
    ReplyTooLargeError,
    ServerStreamError,
    StreamInterruptedError,
)

from .strategies import any_text, cut_points, line_text, wire_bytes

PROPERTY = settings(max_examples=200, deadline=None)


def run(decoder: StreamDecoder, chunks: Iterable[bytes]) -> list[str]:
    """Feed every chunk, then finish: the pieces a caller would see."""
    pieces: list[str] = []
    for chunk in chunks:
        pieces += decoder.feed(chunk)
    pieces += decoder.finish()
    return pieces


def feed_all(decoder: StreamDecoder, chunks: Iterable[bytes]) -> list[str]:
    """Feed every chunk without finishing (what arrives before EOF)."""
    return [piece for chunk in chunks for piece in decoder.feed(chunk)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------- SSE


SSE_CASES: list[tuple[str, list[bytes], list[str]]] = [
    ("lf", [b"data: a\n\ndata: b\n\n"], ["a", "b"]),
    ("crlf", [b"data: a\r\n\r\ndata: b\r\n\r\n"], ["a", "b"]),
    ("cr", [b"data: a\r\rdata: b\r\r"], ["a", "b"]),
    ("mixed line ends", [b"data: a\r\n\ndata: b\r\rdata: c\n\r\n"], ["a", "b", "c"]),
    # A CR ending one chunk and an LF starting the next are one line end, not two:
    # a second, empty line would split the event in two.
    ("cr at chunk end", [b"data: a\r", b"\ndata: b\r\n\r\n"], ["a\nb"]),
    ("cr then lone lf chunk", [b"data: a\r", b"\n", b"data: b\n\n"], ["a\nb"]),
    ("cr then cr across chunks", [b"data: a\r", b"\r"], ["a"]),
    ("crlf split before blank line", [b"data: a\r\n\r", b"\n"], ["a"]),
    ("byte by byte crlf", bytewise(b"data: a\r\ndata: b\r\n\r\n"), ["a\nb"]),
    ("bom stripped", [b"\xef\xbb\xbfdata: a\n\n"], ["a"]),
    ("bom split across chunks", [b"\xef", b"\xbb", b"\xbfdata: a\n\n"], ["a"]),
    # Only one BOM is dropped: the second makes the field name "\ufeffdata", unknown.
    ("second bom kept", [b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n"], ["b"]),
    ("bom later is data", [b"data: \xef\xbb\xbfa\n\n"], ["\ufeffa"]),
    ("comment keep-alive", [b": keep-alive\n\ndata: a\n\n"], ["a"]),
    ("comment inside event", [b"data: a\n: ping\ndata: b\n\n"], ["a\nb"]),
    ("multi-line data", [b"data: a\ndata: b\ndata: c\n\n"], ["a\nb\nc"]),
    ("empty data line joins", [b"data: a\ndata\ndata: b\n\n"], ["a\n\nb"]),
    ("no space after colon", [b"data:a\n\n"], ["a"]),
    ("only one space removed", [b"data:  a\n\n"], [" a"]),
    ("colon in value kept", [b"data: a: b\n\n"], ["a: b"]),
    ("field without colon is empty", [b"data\n\n"], []),
    ("empty data line only", [b"data:\n\n"], []),
    ("event without data not dispatched", [b"event: x\n\n", b"data: a\n\n"], ["a"]),
    ("blank lines alone", [b"\n\n\r\n\r\r"], []),
    ("unknown field ignored", [b"foo: bar\ndata: a\n\n"], ["a"]),
    ("field name is case-sensitive", [b"Data: a\n\ndata: b\n\n"], ["b"]),
    ("id and retry not yielded", [b"id: 1\nretry: 10\ndata: a\n\n"], ["a"]),
    ("custom event name", [b"event: token\ndata: a\n\n"], ["a"]),
    ("ping skipped", [b"event: ping\ndata: {}\n\ndata: a\n\n"], ["a"]),
    ("event name resets", [b"event: ping\ndata: x\n\ndata: y\n\n"], ["y"]),
    ("ping without data resets", [b"event: ping\n\ndata: y\n\n"], ["y"]),
    ("json prompt", [b'data: {"prompt": "tok"}\n\n'], ["tok"]),
    ("json prompt escapes", [b'data: {"prompt": "a\\nb\\u00e9"}\n\n'], ["a\nb\u00e9"]),
    ("json prompt with extras", [b'data: {"prompt": "t", "index": 0}\n\n'], ["t"]),
    ("error null is absent", [b'data: {"prompt": "t", "error": null}\n\n'], ["t"]),
    ("error false is absent", [b'data: {"prompt": "t", "error": false}\n\n'], ["t"]),
    ("error empty is absent", [b'data: {"prompt": "t", "error": ""}\n\n'], ["t"]),
    ("json string", [b'data: "hi there"\n\n'], ["hi there"]),
    ("metadata object skipped", [b'data: {"usage": {"tokens": 3}}\n\ndata: a\n\n'], ["a"]),
    ("empty prompt skipped", [b'data: {"prompt": ""}\n\ndata: ""\n\n'], []),
    ("plain text", [b"data: hello world\n\n"], ["hello world"]),
    ("number is text", [b"data: 42\n\n"], ["42"]),
    ("array is text", [b"data: [1, 2]\n\n"], ["[1, 2]"]),
    ("bad json is text", [b"data: {oops\n\n"], ["{oops"]),
    ("json then more is text", [b'data: {"prompt": "x"} y\n\n'], ['{"prompt": "x"} y']),
    ("json then blanks", [b'data: {"prompt": "x"} \t\n\n'], ["x"]),
    ("bad json string is text", [b'data: "open\n\n'], ['"open']),
    ("leading space keeps text", [b'data:  {"prompt": "x"}\n\n'], [' {"prompt": "x"}']),
    ("multi-line json", [b'data: {"prompt":\ndata: "x"}\n\n'], ["x"]),
    (
        "unicode line separators are not line ends",
        ["data: a\u2028b\x85c\n\n".encode()],
        ["a\u2028b\x85c"],
    ),
    ("multibyte split", [b"data: caf\xc3", b"\xa9 \xe2\x82", b"\xac\n\n"], ["café €"]),
    ("invalid utf-8 replaced", [b"data: a\xffb\n\n"], ["a\ufffdb"]),
    ("done", [b"data: a\n\ndata: [DONE]\n\n"], ["a"]),
    (
        "bytes after done ignored",
        [b"data: a\n\ndata: [DONE]\n\ndata: b\n\n", b"data: c\n\n"],
        ["a"],
    ),
    ("done with crlf", [b"data: [DONE]\r\n\r\n", b"event: error\r\ndata: x\r\n\r\n"], []),
    ("done is exact", [b"data: [DONE] \n\n"], ["[DONE] "]),
    ("unterminated event dropped", [b"data: a\n\ndata: b\n"], ["a"]),
    ("unterminated line dropped", [b"data: a\n\ndata: b"], ["a"]),
    ("empty chunks", [b"", b"data: a\n\n", b""], ["a"]),
]


@pytest.mark.parametrize(
    ("chunks", "expected"), [c[1:] for c in SSE_CASES], ids=[c[0] for c in SSE_CASES]
)
def test_sse_pieces(chunks: list[bytes], expected: list[str]) -> None:
    assert run(SSEDecoder(), chunks) == expected


@pytest.mark.parametrize(
    ("chunks", "expected"), [c[1:] for c in SSE_CASES], ids=[c[0] for c in SSE_CASES]
)
def test_sse_pieces_byte_by_byte(chunks: list[bytes], expected: list[str]) -> None:
    assert run(SSEDecoder(), bytewise(b"".join(chunks))) == expected


@pytest.mark.parametrize(
    ("body", "terminated"),
    [
        (b"data: a\n\ndata: [DONE]\n\n", True),
        (b"data: [DONE]\r\n\r\n", True),
        (b"data:[DONE]\n\n", True),
        # Tolerated at EOF: the [DONE] event lacks only its blank line.
        (b"data: a\n\ndata: [DONE]\n", True),
        (b"data: a\n\ndata: [DONE]", True),
        (b"data: a\n\ndata: [DONE]\r", True),
        (b"data: a\n\ndata:[DONE]", True),
        (b"data: a\n\n", False),
        (b"data: a\n", False),
        (b"", False),
        (b"data: [DONE]x", False),
        (b"data: a\ndata: [DONE]", False),
        (b"event: ping\ndata: [DONE]", False),
        (b"event: ping\ndata: [DONE]\n\n", False),
        (b": [DONE]\n\n", False),
    ],
)
def test_sse_terminated(body: bytes, terminated: bool) -> None:
    decoder = SSEDecoder()
    run(decoder, [body])
    assert decoder.terminated is terminated


def test_sse_feed_after_done_returns_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: [DONE]\n\n") == ["a"]
    assert decoder.terminated
    assert decoder.feed(b"data: b\n\n") == []
    assert decoder.feed(b"event: error\ndata: boom\n\n") == []
    assert decoder.finish() == []


@pytest.mark.parametrize("require_done", [True, False])
def test_sse_requires_terminator_follows_require_done(require_done: bool) -> None:
    assert SSEDecoder(require_done=require_done).requires_terminator is require_done
    decoder = decoder_for("text/event-stream", require_done=require_done)
    assert decoder.requires_terminator is require_done


@pytest.mark.parametrize(
    ("body", "last_event_id", "retry_ms"),
    [
        (b"id: 7\nretry: 1500\ndata: a\n\n", "7", 1500),
        (b"id: 7\ndata: a\n\nid: 8\ndata: b\n\n", "8", None),
        (b"id:x y\n\n", "x y", None),  # set on dispatch even without data
        (b"id: 7\n\nid\n\n", "", None),  # an empty id resets it
        (b"id: 7\n\nid: a\x00b\n\n", "7", None),  # an id holding NUL is ignored
        (b"id: 7\ndata: a\n", "", None),  # not dispatched: not applied
        (b"retry: 10\nretry: x\nretry: -1\nretry: 1.5\n", "", 10),
        (b"retry: \xd9\xa3\n", "", None),  # non-ASCII digits are not a retry
        (b"retry: " + b"9" * 5000 + b"\n", "", None),  # too many digits for int()
        (b"retry: 0\n\n", "", 0),
    ],
)
def test_sse_id_and_retry_are_stored(body: bytes, last_event_id: str, retry_ms: int | None) -> None:
    decoder = SSEDecoder()
    run(decoder, [body])
    assert decoder.last_event_id == last_event_id
    assert decoder.retry_ms == retry_ms


@pytest.mark.parametrize(
    ("body", "server_message"),
    [
        (b"event: error\ndata: boom\n\n", "boom"),
        (b"event: error\ndata: line 1\ndata: line 2\n\n", "line 1\nline 2"),
        (b'event: error\ndata: {"error": "overloaded"}\n\n', "overloaded"),
        (b'event: error\ndata: {"message": "overloaded"}\n\n', "overloaded"),
        (b'event: error\ndata: {"detail": "overloaded"}\n\n', "overloaded"),
        (b'event: error\ndata: {"error": {"message": "nested", "type": "x"}}\n\n', "nested"),
        (b'event: error\ndata: "quoted"\n\n', "quoted"),
        (b'event: error\ndata: {"code": 3}\n\n', '{"code": 3}'),
        (b"event: error\ndata: {broken\n\n", "{broken"),
        (b'event: error\ndata: {"prompt": "x"}\n\n', '{"prompt": "x"}'),
        (b'data: {"error": "out of memory"}\n\n', "out of memory"),
        (b'data: {"error": {"message": "m"}, "prompt": "x"}\n\n', "m"),
        (b'data: {"error": {"code": 5}}\n\n', '{"code": 5}'),
        (b'event: completion\ndata: {"error": "e"}\n\n', "e"),
    ],
)
def test_sse_error_event_raises(body: bytes, server_message: str) -> None:
    decoder = SSEDecoder()
    with pytest.raises(ServerStreamError) as info:
        decoder.feed(body)
    assert info.value.server_message == server_message
    assert server_message.split("\n")[0] in str(info.value)


def test_sse_error_event_without_data_is_not_dispatched() -> None:
    assert run(SSEDecoder(), [b"event: error\n\ndata: a\n\n"]) == ["a"]


@pytest.mark.parametrize(
    "data",
    [b'{"prompt": 3}', b'{"prompt": null}', b'{"prompt": ["a"]}', b'{"prompt": {"t": 1}}'],
)
def test_sse_non_string_prompt_is_contract_error(data: bytes) -> None:
    with pytest.raises(ContractError, match="prompt") as info:
        SSEDecoder().feed(b"data: " + data + b"\n\n")
    assert data.decode() in info.value.body_excerpt


@pytest.mark.parametrize(
    "error_event",
    [b"event: error\ndata: boom\n\n", b'data: {"prompt": 1}\n\n'],
)
def test_sse_pieces_before_an_error_are_returned_first(error_event: bytes) -> None:
    """The error is raised by the next call, so no piece of the same chunk is lost."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n\n" + error_event + b"data: c\n\n") == ["a", "b"]
    with pytest.raises(ModalLLMError) as first:
        decoder.finish()
    with pytest.raises(ModalLLMError) as again:  # sticky: the stream is over
        decoder.feed(b"data: d\n\n")
    assert again.value is first.value


def test_sse_error_in_a_later_chunk_raises_from_feed() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\n") == ["a"]
    with pytest.raises(ServerStreamError):
        decoder.feed(b"event: error\ndata: boom\n\n")


def test_sse_unterminated_error_event_at_eof_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert run(decoder, [b"data: a\n\nevent: error\ndata: boom\n"]) == ["a"]
    assert not decoder.terminated


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: " + b"x" * 64],  # one partial line
        [b"data: " + b"x" * 30, b"x" * 30, b"x" * 30],  # a partial line grown chunk by chunk
        [b"data: " + b"x" * 30 + b"\n" + b"data: " + b"x" * 30 + b"\n"],  # one event's data
        [b"data: \xc3\xa9" * 20],  # counted in characters
    ],
)
def test_sse_max_buffer(chunks: list[bytes]) -> None:
    with pytest.raises(ReplyTooLargeError):
        feed_all(SSEDecoder(max_buffer=50), chunks)


def test_sse_max_buffer_counts_one_line_at_a_time() -> None:
    body = b"".join(b"data: " + b"x" * 30 + b"\n\n" for _ in range(100))
    assert run(SSEDecoder(max_buffer=50), [body]) == ["x" * 30] * 100


# ------------------------------------------------------------------------- NDJSON


NDJSON_CASES: list[tuple[str, list[bytes], list[str]]] = [
    ("lf", [b'{"prompt": "a"}\n{"prompt": "b"}\n'], ["a", "b"]),
    ("crlf", [b'{"prompt": "a"}\r\n{"prompt": "b"}\r\n'], ["a", "b"]),
    ("split line", [b'{"prom', b'pt": "a"}\n{"prompt"', b': "b"}\n'], ["a", "b"]),
    ("crlf split", [b'{"prompt": "a"}\r', b'\n{"prompt": "b"}\r', b"\n"], ["a", "b"]),
    ("last line without newline", [b'{"prompt": "a"}\n{"prompt": "b"}'], ["a", "b"]),
    ("blank lines skipped", [b'\n\r\n  \n{"prompt": "a"}\n\n'], ["a"]),
    ("json string", [b'"a"\n"b"\n'], ["a", "b"]),
    ("metadata skipped", [b'{"prompt": "a"}\n{"usage": {"tokens": 2}}\n'], ["a"]),
    ("empty prompt skipped", [b'{"prompt": ""}\n""\n'], []),
    ("error null is absent", [b'{"prompt": "a", "error": null}\n'], ["a"]),
    ("extras kept out", [b'{"prompt": "a", "index": 1}\n'], ["a"]),
    ("escapes", [b'{"prompt": "a\\nb\\u00e9"}\n'], ["a\nb\u00e9"]),
    ("multibyte split", [b'{"prompt": "caf\xc3', b'\xa9"}\n'], ["café"]),
    ("invalid utf-8 replaced", [b'{"prompt": "a\xffb"}\n'], ["a\ufffdb"]),
    ("bom stripped", [b'\xef\xbb\xbf{"prompt": "a"}\n'], ["a"]),
    ("json-seq record separators", [b'\x1e{"prompt": "a"}\n\x1e"b"\n'], ["a", "b"]),
    ("empty input", [b""], []),
]


@pytest.mark.parametrize(
    ("chunks", "expected"), [c[1:] for c in NDJSON_CASES], ids=[c[0] for c in NDJSON_CASES]
)
def test_ndjson_pieces(chunks: list[bytes], expected: list[str]) -> None:
    decoder = NDJSONDecoder()
    assert run(decoder, chunks) == expected
    assert not decoder.requires_terminator


@pytest.mark.parametrize(
    ("chunks", "expected"), [c[1:] for c in NDJSON_CASES], ids=[c[0] for c in NDJSON_CASES]
)
def test_ndjson_pieces_byte_by_byte(chunks: list[bytes], expected: list[str]) -> None:
    assert run(NDJSONDecoder(), bytewise(b"".join(chunks))) == expected


@pytest.mark.parametrize(
    ("line", "error", "match"),
    [
        (b"not json", ContractError, "not valid JSON"),
        (b'{"prompt": "a"', ContractError, "not valid JSON"),
        (b"data: {}", ContractError, "not valid JSON"),
        (b"42", ContractError, "not a JSON object or string"),
        (b"[1, 2]", ContractError, "not a JSON object or string"),
        (b"null", ContractError, "not a JSON object or string"),
        (b'{"prompt": 3}', ContractError, "prompt"),
        (b'{"prompt": null}', ContractError, "prompt"),
        (b'{"error": "overloaded"}', ServerStreamError, "overloaded"),
        (b'{"error": {"message": "nested"}}', ServerStreamError, "nested"),
        (b'{"error": 0}', ServerStreamError, "0"),
        (b'{"error": true, "prompt": "x"}', ServerStreamError, "true"),
    ],
)
def test_ndjson_bad_line(line: bytes, error: type[ModalLLMError], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        NDJSONDecoder().feed(line + b"\n")
    if isinstance(info.value, ContractError):
        assert line.decode() in info.value.body_excerpt  # the excerpt shows the line
    # At EOF the same line, without its newline, fails the same way; except one that is
    # not JSON: there the body was cut inside a line, an interruption (as in SSE).
    decoder = NDJSONDecoder()
    assert decoder.feed(line) == []
    if match == "not valid JSON":
        error, match = StreamInterruptedError, "middle of a line"
    with pytest.raises(error, match=match):
        decoder.finish()


def test_ndjson_error_line_message() -> None:
    with pytest.raises(ServerStreamError) as info:
        NDJSONDecoder().feed(b'{"error": {"message": "gpu lost", "code": 1}}\n')
    assert info.value.server_message == "gpu lost"


def test_ndjson_pieces_before_an_error_are_returned_first() -> None:
    decoder = NDJSONDecoder()
    assert decoder.feed(b'"a"\n"b"\nnot json\n"c"\n') == ["a", "b"]
    with pytest.raises(ContractError):
        decoder.finish()
    with pytest.raises(ContractError):
        decoder.feed(b'"d"\n')


def test_ndjson_long_invalid_line_is_excerpted() -> None:
    with pytest.raises(ContractError) as info:
        NDJSONDecoder().feed(b"x" * 10_000 + b"\n")
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(
    "chunks",
    [[b'{"prompt": "' + b"x" * 64], [b"x" * 30, b"x" * 30], [b'"ok"\n' + b"x" * 51]],
)
def test_ndjson_max_buffer(chunks: list[bytes]) -> None:
    with pytest.raises(ReplyTooLargeError):
        feed_all(NDJSONDecoder(max_buffer=50), chunks)


def test_ndjson_max_buffer_counts_one_line_at_a_time() -> None:
    body = b"".join(b'{"prompt": "' + b"x" * 30 + b'"}\n' for _ in range(100))
    assert run(NDJSONDecoder(max_buffer=50), [body]) == ["x" * 30] * 100


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("charset", "chunks", "joined"),
    [
        (None, [b"hello ", b"world"], "hello world"),
        (None, [b"caf\xc3", b"\xa9 \xe2", b"\x82", b"\xac"], "café €"),
        (None, [b"\xf0\x9f", b"\x98\x80!"], "😀!"),
        (None, [b"a\xffb"], "a\ufffdb"),
        (None, [b"abc\xe2\x82"], "abc\ufffd"),  # finish() flushes an incomplete character
        (None, [b"\xef\xbb\xbfhi"], "hi"),
        (None, [b"\xef", b"\xbb\xbfhi"], "hi"),
        ("utf-8", [b"\xef\xbb\xbf\xef\xbb\xbfhi"], "\ufeffhi"),
        ("UTF8", [b"caf\xc3", b"\xa9"], "café"),
        ("latin-1", [b"caf\xe9"], "café"),
        ("iso-8859-1", [b"caf", b"\xe9"], "café"),
        ("utf-16", ["hé😀".encode("utf-16")[:3], "hé😀".encode("utf-16")[3:]], "hé😀"),
        ("no-such-charset", [b"caf\xc3\xa9"], "café"),  # unknown: UTF-8
        ("hex", [b"caf\xc3\xa9"], "café"),  # not a text encoding: UTF-8
        (None, [b"line\r\nends\rkept\n"], "line\r\nends\rkept\n"),
    ],
)
def test_text_pieces(charset: str | None, chunks: list[bytes], joined: str) -> None:
    decoder = TextDecoder(charset)
    pieces = run(decoder, chunks)
    assert "".join(pieces) == joined
    assert all(pieces)  # never an empty piece
    assert not decoder.requires_terminator


def test_text_pieces_follow_chunks() -> None:
    assert run(TextDecoder(), [b"Hel", b"lo", b"", b" \xc3", b"\xa9"]) == ["Hel", "lo", " ", "é"]


def test_text_codec_that_rejects_replace_is_contract_error() -> None:
    with pytest.raises(ContractError, match="idna"):
        run(TextDecoder("idna"), [b"abc"])


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b'{"prompt": "whole text"}'], ["whole text"]),
        ([b'{"pro', b'mpt": "caf\xc3', b'\xa9", "usage": {"n": 1}}'], ["café"]),
        ([b'{"prompt": ""}'], []),
    ],
)
def test_json_pieces(chunks: list[bytes], expected: list[str]) -> None:
    decoder = JSONDecoder()
    pieces: list[str] = []
    for chunk in chunks:
        pieces += decoder.feed(chunk)
        assert pieces == []  # nothing before EOF
    pieces += decoder.finish()
    assert pieces == expected
    assert not decoder.requires_terminator


def test_json_keeps_the_completion() -> None:
    decoder = JSONDecoder()
    run(decoder, [b'{"prompt": "t", "usage": {"n": 2}}'])
    assert decoder.completion is not None
    assert decoder.completion.data == {"prompt": "t", "usage": {"n": 2}}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "not valid JSON"),
        (b"not json", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"usage": 1}', 'no "prompt" key'),
        (b'{"prompt": 1}', "not a string"),
    ],
)
def test_json_contract_errors(body: bytes, match: str) -> None:
    with pytest.raises(ContractError, match=match):
        run(JSONDecoder(), [body])


def test_json_max_buffer() -> None:
    decoder = JSONDecoder(max_buffer=50)
    decoder.feed(b'{"prompt": "' + b"x" * 30)
    with pytest.raises(ReplyTooLargeError):
        decoder.feed(b"x" * 30)


# --------------------------------------------------------------------- decoder_for


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("text/event-stream", SSEDecoder),
        ("Text/Event-Stream; charset=utf-8", SSEDecoder),
        ("text/event-stream;charset=latin-1", SSEDecoder),
        ("application/x-ndjson", NDJSONDecoder),
        ("application/ndjson", NDJSONDecoder),
        ("application/jsonl", NDJSONDecoder),
        ("APPLICATION/X-JSONLINES", NDJSONDecoder),
        ("application/json-seq", NDJSONDecoder),
        ("application/json", JSONDecoder),
        ("application/json; charset=utf-8", JSONDecoder),
        ("Application/JSON", JSONDecoder),
        ("application/problem+json", JSONDecoder),
        ("text/plain", TextDecoder),
        ("text/plain; charset=utf-8", TextDecoder),
        ("text/markdown", TextDecoder),
        ("text/html", TextDecoder),
        (None, TextDecoder),
        ("", TextDecoder),
        ("application/octet-stream", TextDecoder),
        ("garbage", TextDecoder),
    ],
)
def test_decoder_for(content_type: str | None, kind: type[object]) -> None:
    assert type(decoder_for(content_type)) is kind


@pytest.mark.parametrize(
    ("content_type", "charset"),
    [
        ("text/plain; charset=latin-1", "iso8859-1"),
        ('text/plain; Charset="ISO-8859-1"', "iso8859-1"),
        ("text/plain;format=flowed;charset=utf-16", "utf-16"),
        ("text/plain", "utf-8-sig"),
        ("text/plain; charset=utf-8", "utf-8-sig"),
        ("text/plain; charset=", "utf-8-sig"),
        ("text/plain; charset=bogus", "utf-8-sig"),
        ("application/octet-stream; charset=latin-1", "iso8859-1"),
    ],
)
def test_decoder_for_text_charset(content_type: str, charset: str) -> None:
    decoder = decoder_for(content_type)
    assert isinstance(decoder, TextDecoder)
    assert decoder.charset == charset


def test_decoder_for_charset_decodes() -> None:
    decoder = decoder_for("text/plain; charset=latin-1")
    assert run(decoder, [b"caf\xe9"]) == ["café"]


def test_decoder_for_passes_max_buffer() -> None:
    for content_type in ("text/event-stream", "application/x-ndjson", "application/json"):
        decoder = decoder_for(content_type, max_buffer=10)
        with pytest.raises(ReplyTooLargeError):
            decoder.feed(b"x" * 11)


# --------------------------------------------------------------------- properties

# codec="utf-8" leaves out surrogates (not encodable). Line text holds no line end; plain
# text holds no CR (a line end in SSE) but may hold LF (it becomes a second data line).
_line_text = line_text
_plain_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r"), max_size=12
).filter(lambda t: t[:1] not in ("{", '"') and t != "[DONE]")
_any_text = any_text


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[str], bool]:
    """A valid SSE body, the pieces it must give, and whether it ends with [DONE]."""
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines: list[str] = []
    expected: list[str] = []
    kinds = st.sampled_from(["json", "string", "plain", "meta", "comment", "ping", "fields"])
    for kind in draw(st.lists(kinds, max_size=8)):
        if kind == "json":
            piece = draw(_any_text)
            obj = {"prompt": piece, "index": draw(st.integers(0, 9))}
            lines += [f"data: {json.dumps(obj, ensure_ascii=draw(st.booleans()))}", ""]
        elif kind == "string":
            piece = draw(_any_text)
            lines += [f"data:{json.dumps(piece, ensure_ascii=draw(st.booleans()))}", ""]
        elif kind == "plain":
            piece = draw(_plain_text)
            lines += [f"data: {part}" for part in piece.split("\n")] + [""]
        elif kind == "meta":
            piece = ""
            lines += ['data: {"usage": {"tokens": 3}}', ""]
        elif kind == "comment":
            piece = ""
            lines += [f":{draw(_line_text)}"]
        elif kind == "ping":
            piece = ""
            lines += ["event: ping", f"data: {draw(_line_text)}", ""]
        else:
            piece = ""
            lines += [f"id: {draw(_line_text)}", "retry: 100", "x-unknown: 1"]
        if piece:
            expected.append(piece)
    done = draw(st.booleans())
    if done:
        lines += ["data: [DONE]", "", "data: after done", ""]
    bom = "\ufeff" if draw(st.booleans()) else ""
    body = bom + "".join(line + eol for line in lines)
    return body.encode(), expected, done


@st.composite
def ndjson_streams(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A valid NDJSON body and the pieces it must give."""
    parts: list[bytes] = []
    expected: list[str] = []
    kinds = st.sampled_from(["json", "string", "meta", "blank"])
    for kind in draw(st.lists(kinds, max_size=8)):
        ascii_only = draw(st.booleans())
        if kind == "json":
            piece = draw(_any_text)
            line = json.dumps({"prompt": piece}, ensure_ascii=ascii_only)
        elif kind == "string":
            piece = draw(_any_text)
            line = json.dumps(piece, ensure_ascii=ascii_only)
        elif kind == "meta":
            piece, line = "", '{"usage": {"tokens": 3}}'
        else:
            piece, line = "", " "
        parts.append(line.encode() + draw(st.sampled_from([b"\n", b"\r\n"])))
        if piece:
            expected.append(piece)
    body = b"".join(parts)
    if draw(st.booleans()):  # the last line may lack its newline
        body = body.rstrip(b"\r\n")
    return body, expected


_points = cut_points(12)


@PROPERTY
@given(stream=sse_streams(), points=_points)
def test_property_sse_any_chunking_gives_the_same_pieces(
    stream: tuple[bytes, list[str], bool], points: list[int]
) -> None:
    body, expected, done = stream
    decoder = SSEDecoder()
    assert run(decoder, split_at(body, points)) == expected
    assert decoder.terminated is done


@PROPERTY
@given(stream=ndjson_streams(), points=_points)
def test_property_ndjson_any_chunking_gives_the_same_pieces(
    stream: tuple[bytes, list[str]], points: list[int]
) -> None:
    body, expected = stream
    assert run(NDJSONDecoder(), split_at(body, points)) == expected


@PROPERTY
@given(
    text=st.text(alphabet=st.characters(codec="utf-8")),
    charset=st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1"]),
    points=_points,
)
def test_property_text_any_chunking_gives_the_same_text(
    text: str, charset: str, points: list[int]
) -> None:
    if charset == "latin-1":
        text = text.encode("latin-1", "replace").decode("latin-1")
    body = text.encode(charset)
    if charset == "utf-8":
        text = text.removeprefix("\ufeff")  # a leading BOM is a BOM, not text
    pieces = run(TextDecoder(charset), split_at(body, points))
    assert "".join(pieces) == text
    assert all(pieces)


@PROPERTY
@given(text=_any_text, points=_points)
def test_property_json_any_chunking_gives_one_piece(text: str, points: list[int]) -> None:
    body = json.dumps({"prompt": text, "usage": {"n": 1}}).encode()
    assert run(JSONDecoder(), split_at(body, points)) == ([text] if text else [])


_fuzz_bytes = wire_bytes(200, 40)
_CONTENT_TYPES = [
    "text/event-stream",
    "application/x-ndjson",
    "application/json",
    "text/plain",
    "text/plain; charset=utf-16",
    "text/plain; charset=idna",
    None,
]


@PROPERTY
@given(
    body=_fuzz_bytes,
    points=_points,
    content_type=st.sampled_from(_CONTENT_TYPES),
    max_buffer=st.sampled_from([8, DEFAULT_MAX_BUFFER]),
    require_done=st.booleans(),
)
def test_property_fuzz_only_modal_llm_errors_escape(
    body: bytes,
    points: list[int],
    content_type: str | None,
    max_buffer: int,
    require_done: bool,
) -> None:
    decoder = decoder_for(content_type, require_done=require_done, max_buffer=max_buffer)
    try:
        pieces = run(decoder, split_at(body, points))
    except ModalLLMError:
        return
    assert all(isinstance(piece, str) and piece for piece in pieces)


@PROPERTY
@given(body=_fuzz_bytes, points=_points)
def test_property_fuzz_sse_chunking_never_changes_the_outcome(
    body: bytes, points: list[int]
) -> None:
    """Pieces, termination and the error (its type) are the same however bytes arrive."""

    def outcome(chunks: list[bytes]) -> tuple[list[str], bool, type[Exception] | None]:
        decoder = SSEDecoder()
        pieces: list[str] = []
        try:
            for chunk in chunks:
                pieces += decoder.feed(chunk)
            pieces += decoder.finish()
        except ModalLLMError as exc:
            return pieces, decoder.terminated, type(exc)
        return pieces, decoder.terminated, None

    assert outcome(split_at(body, points)) == outcome([body])


# -- the last event at EOF when no [DONE] is required (issue 10, fault 10) ----------------------


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"data: a\n\ndata: b\n"], ["a", "b"]),  # complete lines, no blank line: delivered
        ([b"data: a\n\ndata: b\r"], ["a", "b"]),  # a CR ends a line too
        ([b"data: a\n\ndata: b\ndata: c\n"], ["a", "b\nc"]),
        ([b"data: a\n\n"], ["a"]),
        ([b"data: a\n\ndata: [DONE]"], ["a"]),  # a last [DONE] still counts
        ([b"data: a\n\n: comment\n"], ["a"]),
    ],
)
def test_sse_last_event_is_delivered_at_eof_without_done(
    chunks: list[bytes], expected: list[str]
) -> None:
    assert run(SSEDecoder(require_done=False), chunks) == expected
    assert run(SSEDecoder(require_done=False), bytewise(b"".join(chunks))) == expected


def test_sse_half_line_at_eof_is_an_interruption_without_done() -> None:
    decoder = SSEDecoder(require_done=False)
    assert feed_all(decoder, [b"data: a\n\ndata: b"]) == ["a"]
    with pytest.raises(StreamInterruptedError, match="middle of a line"):
        decoder.finish()


def test_sse_error_event_at_eof_is_raised_without_done() -> None:
    decoder = SSEDecoder(require_done=False)
    assert feed_all(decoder, [b"data: a\n\nevent: error\ndata: boom\n"]) == ["a"]
    with pytest.raises(ServerStreamError, match="boom"):
        decoder.finish()


@pytest.mark.parametrize(
    ("content_type", "refused"),
    [
        ("text/html", "text/html"),
        ("Text/HTML; charset=utf-8", "text/html"),
        ("application/xhtml+xml", "application/xhtml+xml"),
        ("text/plain", None),
        ("application/json", None),
        (None, None),
        ("text/event-stream", None),
    ],
)
def test_refused_media_types(content_type: str | None, refused: str | None) -> None:
    assert refused_media_type(content_type) == refused
