"""A server's text reaches a terminal only as one printable line (review R8).

An error body, a stream's error event or a reason phrase is the server's text: a terminal
escape sequence in it (ESC, BEL, a bidi override) must come out escaped in ``str(error)``,
``body_excerpt``, span descriptions and the CLI's stderr, never as raw control characters.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aiohttp import web

from modal_llm import AsyncClient, ServerStreamError, StatusError
from modal_llm._exceptions import excerpt, printable

from ..cli_support import modal_llm
from ..conftest import MakeEndpoint

HOSTILE = "bad\x1b]0;TITLE\x07\x1b[2K\rfake: all good\x1b[8m hidden \u202eevil\x85\x9b31m"
# Anything a terminal or a log viewer would act on, rather than show.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def test_printable_escapes_every_control_and_bidi_character() -> None:
    shown = printable(HOSTILE)
    assert not CONTROL.search(shown)
    assert "\\x1b]0;TITLE\\x07" in shown and "\\u202e" in shown and "\\x9b" in shown
    assert printable("plain text, émoji 🐈, tabs	gone") == "plain text, émoji 🐈, tabs\\x09gone"
    assert not CONTROL.search(excerpt(HOSTILE.encode()))


async def test_an_error_body_reads_as_one_printable_line(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=400, text=HOSTILE)

    url = await make_endpoint(handler)
    async with AsyncClient(url) as client:
        with pytest.raises(StatusError) as caught:
            await client.generate("hi")
    error = caught.value
    assert not CONTROL.search(str(error)) and not CONTROL.search(repr(error))
    assert not CONTROL.search(error.body_excerpt)
    assert "\\x1b]0;TITLE" in str(error)

    ran = await modal_llm("generate", "--endpoint", url, "--max-retries", "0", "hi")
    line = ran.one_line_error("400")
    assert not CONTROL.search(line) and "\\x1b[2K" in line


async def test_a_stream_error_event_reads_as_one_printable_line(
    make_endpoint: MakeEndpoint,
) -> None:
    async def handler(request: web.Request) -> Any:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"data: {json.dumps({'prompt': 'a'})}\n\n".encode())
        await resp.write(f"event: error\ndata: {json.dumps({'error': HOSTILE})}\n\n".encode())
        await resp.write_eof()
        return resp

    async with AsyncClient(await make_endpoint(handler)) as client:
        with pytest.raises(ServerStreamError) as caught:
            async for _ in client.stream("hi"):
                pass
    assert not CONTROL.search(str(caught.value))
    assert "\\x1b" in str(caught.value)
