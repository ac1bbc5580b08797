"""Hypothesis strategies shared by the decoder and fuzz tests: bytes off the wire, the
points where a body is cut into chunks, and short texts."""

from __future__ import annotations

from hypothesis import strategies as st

WIRE_FRAGMENTS = [
    b"data:",
    b"data: ",
    b"event: error",
    b"event: ping",
    b"id: 7",
    b"retry: 1",
    b":",
    b"\n",
    b"\r\n",
    b"\r",
    b"\x1e",
    b"[DONE]",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b'"',
    b'"prompt"',
    b'"error"',
    b'"message"',
    b": ",
    b"null",
    b"true",
    b"-1.5e3",
    b"\\u00e9",
    b"\\ud800",
    b"\xef\xbb\xbf",
    b"\xc3",
    b"\xa9",
    b"\xe2\x82",
    b"\xff\xfe",
    b"\x00",
    b"x",
    b"id: ",
    b"retry: 99",
    b"1",
    b"\xff",
]
"""Pieces of SSE, NDJSON, JSON and broken UTF-8 that fuzzed bodies are built from."""


def wire_bytes(max_size: int, max_fragments: int) -> st.SearchStrategy[bytes]:
    """Random bytes, or a run of up to ``max_fragments`` of ``WIRE_FRAGMENTS``."""
    return st.one_of(
        st.binary(max_size=max_size),
        st.lists(st.sampled_from(WIRE_FRAGMENTS), max_size=max_fragments).map(b"".join),
    )


def cut_points(max_size: int = 16) -> st.SearchStrategy[list[int]]:
    """Offsets where a body is cut into chunks (taken modulo its length by the tests)."""
    return st.lists(st.integers(min_value=0), max_size=max_size)


line_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
"""Text without line ends: header values, SSE field values. codec="utf-8" leaves out
surrogates (not encodable)."""
any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
"""Any encodable text of up to 12 characters."""
