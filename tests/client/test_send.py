"""The request a call sends and the reply contract it checks, over loopback HTTP."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    AuthenticationError,
    ConfigError,
    ContractError,
    EndpointTimeoutError,
    ModalLLMError,
    ReplyTooLargeError,
)

from ..conftest import MakeEndpoint
from .helpers import KEY, SECRET, Recorder, reply


async def test_requests_go_through_the_sessions_request_method_looked_up_per_call(
    make_endpoint: MakeEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The send path awaits ``ClientSession._request`` (what ``request()`` wraps) and looks it
    # up on every request: a double or tracer that patches it after the client opened (as
    # aioresponses and ddtrace do) sees every attempt, and an aiohttp without it fails here.
    async def handler(request: web.Request) -> web.Response:
        return reply("ok")

    url = await make_endpoint(handler)
    seen: list[tuple[str, str]] = []
    original = aiohttp.ClientSession._request

    async def spy(
        self: aiohttp.ClientSession, method: str, str_or_url: object, **kw: object
    ) -> aiohttp.ClientResponse:
        seen.append((method, str(str_or_url)))
        assert {"data", "headers", "allow_redirects", "timeout"} <= set(kw)
        return await original(self, method, str_or_url, **kw)  # type: ignore[arg-type]

    async with AsyncClient(url) as c:
        assert await c.generate("a") == "ok"
        monkeypatch.setattr(aiohttp.ClientSession, "_request", spy)
        assert await c.generate("b") == "ok"
        results = [r async for r in c.map(["c"])]
        assert [r.text for r in results] == ["ok"]
    assert seen == [("POST", url), ("POST", url)]


async def test_request_body_headers_and_extras(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        return reply("This is the LLM speaking", usage={"tokens": 5})

    url = await make_endpoint(handler, path="/v1/generate")
    async with AsyncClient(url, modal_key=KEY, modal_secret=SECRET, headers={"X-Team": "a"}) as c:
        text = await c.generate(
            "Identify yourself, bot!",
            max_tokens=64,
            temperature=0.5,
            headers={"Modal-Routing-Affinity-Key": "conv-1"},
        )
        full = await c.complete("again", top_p=0.9)

    assert text == "This is the LLM speaking"
    assert rec.bodies[0] == {
        "prompt": "Identify yourself, bot!",
        "max_tokens": 64,
        "temperature": 0.5,
    }
    assert rec.bodies[1] == {"prompt": "again", "top_p": 0.9}
    first = rec.headers[0]
    assert first["Content-Type"] == "application/json"
    assert first["Modal-Key"] == KEY and first["Modal-Secret"] == SECRET
    assert first["X-Team"] == "a"
    assert first["Modal-Routing-Affinity-Key"] == "conv-1"
    assert first["X-Modal-LLM-Attempt"] == "1"
    assert len(first["Idempotency-Key"]) == 32
    assert first["Idempotency-Key"] != rec.headers[1]["Idempotency-Key"]
    assert "Modal-Routing-Affinity-Key" not in rec.headers[1]
    assert first["User-Agent"].startswith("modal-llm")
    assert full.text == "This is the LLM speaking"
    assert full.data == {"prompt": "This is the LLM speaking", "usage": {"tokens": 5}}


async def test_generated_text_need_not_contain_prompt(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("")

    async with AsyncClient(await make_endpoint(handler)) as c:
        assert await c.generate("anything") == ""


async def test_env_fallbacks(make_endpoint: MakeEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        return reply("ok")

    monkeypatch.setenv("MODAL_LLM_ENDPOINT_URL", await make_endpoint(handler))
    monkeypatch.setenv("MODAL_LLM_KEY", KEY)
    monkeypatch.setenv("MODAL_LLM_SECRET", SECRET)
    async with AsyncClient() as c:
        assert await c.generate("hi") == "ok"
    assert rec.headers[0]["Modal-Key"] == KEY


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"<html>oops</html>", "text/html", "HTML page (text/html)"),
        (b'["a"]', "application/json", "not a JSON object"),
        (b'"text"', "application/json", "not a JSON object"),
        (b'{"text": "x"}', "application/json", 'no "prompt"'),
        (b'{"prompt": 42}', "application/json", "not a string"),
        (b'{"prompt": null}', "application/json", "not a string"),
        (b"", "application/json", "not valid JSON"),
    ],
)
async def test_contract_violations(
    make_endpoint: MakeEndpoint, body: bytes, content_type: str, reason: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    async with AsyncClient(await make_endpoint(handler)) as c:
        with pytest.raises(ContractError) as info:
            await c.generate("hi")
    err = info.value
    assert reason in str(err)
    assert err.status_code == 200
    assert "(status 200)" in str(err)
    assert err.body_excerpt == body.decode()[:300]
    assert "\n" not in str(err)


async def test_reply_size_cap(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("x" * 5000)

    async with AsyncClient(await make_endpoint(handler), max_reply_bytes=1000) as c:
        with pytest.raises(ReplyTooLargeError):
            await c.generate("hi")


async def test_a_reply_without_content_length_is_read_whole_within_the_cap(
    make_endpoint: MakeEndpoint,
) -> None:
    """Chunked replies take the piecewise read (no size known up front); the cap still holds
    and every slot and connection comes back, as for the usual sized reply."""

    async def handler(request: web.Request) -> web.StreamResponse:
        size = int((await request.json())["prompt"])
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b'{"prompt": "')
        for _ in range(size // 100):
            await resp.write(b"x" * 100)
        await resp.write(b'"}')
        await resp.write_eof()
        return resp

    async with AsyncClient(await make_endpoint(handler), max_reply_bytes=1000) as c:
        assert await c.generate("500") == "x" * 500
        with pytest.raises(ReplyTooLargeError, match="after"):
            await c.generate("5000")
        assert (await c.complete("300")).text == "x" * 300
        assert c.pool.slots_in_use == 0 and c.pool.connections_in_use == 0


async def test_stop_sequences_cut_generate(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("Answer: 42\n\nQuestion: next")

    async with AsyncClient(await make_endpoint(handler)) as c:
        assert await c.generate("q", stop=["\n\n"]) == "Answer: 42"
        assert await c.generate("q", stop="Question") == "Answer: 42\n\n"


async def test_repr_and_errors_hide_credentials(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=401, text="modal-http: missing credentials for proxy authorization"
        )

    url = await make_endpoint(handler)
    async with AsyncClient(url + "?token=s3cret", modal_key=KEY, modal_secret=SECRET) as c:
        assert KEY not in repr(c) and SECRET not in repr(c.options)
        with pytest.raises(AuthenticationError) as info:
            await c.generate("hi")
    err = info.value
    for text in (str(err), repr(err), json.dumps(err.headers)):
        assert KEY not in text and SECRET not in text and "s3cret" not in text
    assert "missing credentials" in str(err)


async def test_bad_call_arguments(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("x")

    async with AsyncClient(await make_endpoint(handler)) as c:
        with pytest.raises(ConfigError, match="prompt must be a str"):
            await c.generate(123)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="JSON-serializable"):
            await c.generate("hi", callback=object())
        with pytest.raises(ConfigError, match="CR, LF"):
            await c.generate("hi", headers={"X": "a\nb"})


def test_aiohttp_is_hidden() -> None:
    # No aiohttp exception class is part of our error tree.
    assert not issubclass(ModalLLMError, aiohttp.ClientError)
    assert issubclass(EndpointTimeoutError, TimeoutError)
    assert issubclass(ConfigError, ValueError)
