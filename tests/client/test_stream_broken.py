"""A stream that breaks the contract or the size cap after pieces reached the caller.

docs/errors.md: "a stream failing after its first piece: never retried, ``StreamError``
with ``.partial_text``", whichever chunk brings the fault (review R1: a bad line in its
own chunk raised a bare ``ContractError`` without ``partial_text``, in the same chunk a
``ContractError`` with a ``partial_text`` attribute patched on).
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from modal_llm import AsyncClient, ContractError, ReplyTooLargeError, StreamError

from ..conftest import MakeEndpoint

ND, SSE = "application/x-ndjson", "text/event-stream"
CASES = {
    "nd-bad-line": (ND, b'{"prompt": "a"}\n{"prompt": "b"}\n', b"oops\n", ContractError),
    "nd-prompt-int": (ND, b'{"prompt": "a"}\n{"prompt": "b"}\n', b'{"prompt": 5}\n', ContractError),
    "sse-prompt-null": (
        SSE,
        b'data: {"prompt": "a"}\n\ndata: {"prompt": "b"}\n\n',
        b'data: {"prompt": null}\n\n',
        ContractError,
    ),
    "sse-over-cap": (
        SSE,
        b'data: {"prompt": "a"}\n\ndata: {"prompt": "b"}\n\n',
        b"data: " + b"x" * 5000 + b"\n\n",
        ReplyTooLargeError,
    ),
}


@pytest.mark.parametrize("own_chunk", [True, False], ids=["own-chunk", "same-chunk"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_fault_after_pieces_is_a_stream_error_with_the_text_so_far(
    make_endpoint: MakeEndpoint, case: str, own_chunk: bool
) -> None:
    content_type, good, bad, cause = CASES[case]
    read = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        if own_chunk:
            await resp.write(good)
            await read.wait()  # the client has the good pieces: the fault comes alone
            await resp.write(bad)
        else:
            await resp.write(good + bad)
        await resp.write_eof()
        return resp

    pieces: list[str] = []
    if case == "sse-over-cap" and not own_chunk:  # the first chunk is over: no piece yet
        async with AsyncClient(await make_endpoint(handler), max_reply_bytes=4096) as c:
            with pytest.raises(ReplyTooLargeError):
                async with c.stream("hi") as stream:
                    pieces += [piece async for piece in stream]
        assert pieces == []
        return
    async with AsyncClient(await make_endpoint(handler), max_reply_bytes=4096) as c:
        with pytest.raises(StreamError) as info:
            async with c.stream("hi") as stream:
                async for piece in stream:
                    pieces.append(piece)
                    if "".join(pieces) == "ab":
                        read.set()
    error = info.value
    assert "".join(pieces) == "ab"
    assert error.partial_text == "ab"
    assert isinstance(error.__cause__, cause)
    assert str(error).startswith("stream broken after 2 pieces: ")
    assert "\n" not in str(error)
    assert error.url is not None and error.attempts == 1
