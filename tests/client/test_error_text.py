"""What errors say and keep: one printable line, the package's own classes for whatever
aiohttp/yarl/idna raise, masked credentials that still resume, delivered text unaltered.

Review session 3: R7 (a host label over 63 characters), R8 (control characters from a
server's body), R9 (aiohttp's parser text), R17 (what counts as a credential header), R21
(a masked result URL), R22 (partial_text rewritten by masking), R16 (a masked URL sent).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    ConfigError,
    ConnectError,
    ContractError,
    RedirectError,
    ResultPendingError,
    StatusError,
    StreamInterruptedError,
)
from modal_llm._auth import is_credential_header

from ..conftest import NO_WAIT, MakeEndpoint

LONG_LABEL_HOST = "a" * 64 + ".example"


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """A TCP server on 127.0.0.1 that answers every request with the given bytes."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def test_an_endpoint_host_with_a_label_over_63_characters_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="a label is over 63 characters"):
        AsyncClient(f"http://{LONG_LABEL_HOST}/")


def test_a_masked_endpoint_url_is_refused() -> None:
    # A URL copied from a repr or an error would send "***" as the credential.
    for url in ("http://127.0.0.1:9/?token=***", "http://127.0.0.1:9/?***"):
        with pytest.raises(ConfigError, match="masked"):
            AsyncClient(url)


@pytest.mark.parametrize("op", ["generate", "stream"])
async def test_a_redirect_to_a_host_with_a_long_label_is_a_redirect_error(
    make_endpoint: MakeEndpoint, op: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=303, headers={"Location": f"http://{LONG_LABEL_HOST}/r"})

    async with AsyncClient(await make_endpoint(handler), max_retries=0) as c:
        with pytest.raises(RedirectError, match="malformed URL") as info:
            if op == "generate":
                await c.generate("hi")
            else:
                async with c.stream("hi") as stream:
                    async for _ in stream:
                        pass
    assert "\n" not in str(info.value)


async def test_control_characters_in_an_error_body_are_escaped(
    make_endpoint: MakeEndpoint,
) -> None:
    body = "bad\x1b]0;TITLE\x07\x1b[2K\rfake: all good\x1b[8m hidden\x00\x9b"

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=400, text=body)

    async with AsyncClient(await make_endpoint(handler), max_retries=0) as c:
        with pytest.raises(StatusError) as info:
            await c.generate("hi")
    text = str(info.value)
    assert not any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in text), repr(text)
    assert "bad\\x1b]0;TITLE\\x07\\x1b[2K fake: all good\\x1b[8m hidden\\x00\\x9b" in text
    assert info.value.body_excerpt in text


async def test_a_garbage_status_line_reads_as_what_it_is(
    raw_server: Callable[[bytes], Awaitable[str]],
) -> None:
    url = await raw_server(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}")
    async with AsyncClient(url + "?token=abcdef", max_retries=0) as c:
        with pytest.raises(ConnectError) as info:
            await c.generate("hi")
    text = str(info.value)
    assert text.startswith("malformed HTTP reply: Bad status line"), text
    assert "400" not in text and "url=" not in text and "\\n" not in text and "abcdef" not in text


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("X-Api-Key", True),
        ("x-auth-token", True),
        ("X-Session-Id", True),
        ("Authorization", True),
        ("Cookie", True),
        ("X-Password", True),
        ("Modal-Routing-Affinity-Key", False),  # contract section 3: routing, not a secret
        ("Idempotency-Key", False),
        ("X-Author", False),
        ("X-Tokenizer", False),
        ("X-Keyword", False),
        ("Content-Type", False),
    ],
)
def test_what_counts_as_a_credential_header(name: str, secret: bool) -> None:
    assert is_credential_header(name) is secret


async def test_a_masked_result_url_still_resumes_with_query_auth(
    make_endpoint: MakeEndpoint,
) -> None:
    token = "qs-RESUME-TOKEN-4411"
    ready = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if request.query.get("token") != token:
            return web.Response(status=401, text="bad token")
        if request.method == "POST" or not ready.is_set():
            location = f"/?token={token}&__modal_function_call_id=fc-1"
            return web.Response(status=303, headers={"Location": location})
        return web.json_response({"prompt": "the result"})

    async with AsyncClient(await make_endpoint(handler) + f"?token={token}", max_redirects=2) as c:
        with pytest.raises(ResultPendingError) as info:
            await c.generate("long")
        assert token not in info.value.result_url  # masked, as every attribute
        ready.set()
        assert (await c.resume(info.value.result_url)).text == "the result"
        with pytest.raises(ConfigError, match="result_url must be a str"):
            await c.resume(5)  # type: ignore[arg-type]


async def test_partial_text_is_exactly_the_delivered_text(make_endpoint: MakeEndpoint) -> None:
    # A query value (masked wherever a server echoes it) that the model happens to write.
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"prompt": "I am llama, "}\n\n')
        await resp.write(b'data: {"prompt": "ask me"}\n\n')
        await resp.write_eof()  # no [DONE]: interrupted
        return resp

    pieces: list[str] = []
    async with AsyncClient(await make_endpoint(handler) + "?model=llama") as c:
        with pytest.raises(StreamInterruptedError) as info:
            async with c.stream("hi") as stream:
                async for piece in stream:
                    pieces.append(piece)
    assert info.value.partial_text == "".join(pieces) == "I am llama, ask me"


async def test_a_contract_break_after_a_retry_says_how_many_attempts(
    make_endpoint: MakeEndpoint,
) -> None:
    # Review R15: the unary path left .attempts None on a ContractError from the parse.
    seen: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(1)
        if len(seen) % 2:
            return web.Response(status=503, headers={"Retry-After": "0"}, text="busy")
        return web.json_response({"prompt": 5})

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        with pytest.raises(ContractError) as info:
            await c.generate("hi")
        assert info.value.attempts == 2 and "after 2 attempts" in str(info.value)
        [result] = [r async for r in c.map(["hi"])]
        assert result.attempts == 2 and result.error is not None


async def test_wrong_typed_arguments_are_config_errors_before_anything_is_sent(
    make_endpoint: MakeEndpoint,
) -> None:
    # Review R5: bare AttributeError/TypeError, and map's on_progress found after every POST.
    posts: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        posts.append(1)
        return web.json_response({"prompt": "ok"})

    async with AsyncClient(await make_endpoint(handler)) as c:
        with pytest.raises(ConfigError, match="headers must be a mapping"):
            await c.generate("hi", headers=[("X-A", "1")])  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="on_progress must be callable"):
            [r async for r in c.map(["a", "b"], on_progress=5)]  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="prompts must be an iterable"):
            await c.generate_many(5)  # type: ignore[call-overload]
    assert posts == []


@pytest.mark.parametrize("name", ["Idempotency-Key", "idempotency-key"])
async def test_a_callers_own_idempotency_key_is_sent_on_every_attempt(
    make_endpoint: MakeEndpoint, name: str
) -> None:
    # Review R11: a per-call key was silently replaced by the generated one.
    keys: list[list[str]] = []

    async def handler(request: web.Request) -> web.Response:
        keys.append(request.headers.getall("Idempotency-Key"))
        if len(keys) == 1:
            return web.Response(status=503, headers={"Retry-After": "0"}, text="busy")
        return web.json_response({"prompt": "ok"})

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        assert await c.generate("hi", headers={name: "job-42"}) == "ok"
    assert keys == [["job-42"], ["job-42"]]
