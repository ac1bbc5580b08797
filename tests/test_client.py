"""AsyncClient against real loopback HTTP: contract, retries, timeouts, 303 chain, auth."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import gc
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    AuthenticationError,
    ClientClosedError,
    ConfigError,
    ConnectError,
    ContractError,
    EndpointTimeoutError,
    ModalLLMError,
    RateLimitError,
    RedirectError,
    ReplyTooLargeError,
    ResultPendingError,
    RetryPolicy,
    ServerError,
    StatusError,
    Timeout,
)

from .conftest import NO_WAIT, MakeEndpoint

KEY, SECRET = "wk-test-key-123", "ws-test-secret-456"


def reply(text: str, **extra: Any) -> web.Response:
    return web.json_response({"prompt": text, **extra})


class Recorder:
    """Counts what the server saw, per method, with the last request's headers and bodies."""

    def __init__(self) -> None:
        self.posts = 0
        self.gets = 0
        self.headers: list[dict[str, str]] = []
        self.bodies: list[Any] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def record(self, request: web.Request) -> None:
        if request.method == "POST":
            self.posts += 1
            self.bodies.append(await request.json())
        else:
            self.gets += 1
        self.headers.append(dict(request.headers))


# -- the request --


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


# -- retries --


async def test_429_retry_after_seconds_is_honoured(
    make_endpoint: MakeEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if rec.posts == 1:
            return web.Response(status=429, text="slow down", headers={"Retry-After": "0.05"})
        return reply("done")

    caplog.set_level(logging.INFO, logger="modal_llm")
    url = await make_endpoint(handler)
    async with AsyncClient(url, retry=NO_WAIT, modal_key=KEY, modal_secret=SECRET) as c:
        assert await c.generate("hi") == "done"
    assert rec.posts == 2
    # The fallback backoff is 0 here, so a 0.05 s sleep can only come from Retry-After.
    assert any("sleeping 0.05s" in r.getMessage() for r in caplog.records)
    assert rec.headers[1]["X-Modal-LLM-Attempt"] == "2"
    assert rec.headers[0]["Idempotency-Key"] == rec.headers[1]["Idempotency-Key"]
    for record in caplog.records:
        assert KEY not in record.getMessage() and SECRET not in record.getMessage()


async def test_429_retry_after_http_date(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()
    past = email.utils.formatdate(time.time() - 5, usegmt=True)

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if rec.posts == 1:
            return web.Response(status=429, headers={"Retry-After": past})
        return reply("done")

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        assert await c.generate("hi") == "done"
    assert rec.posts == 2


async def test_retry_after_beyond_cap_raises_at_once(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        return web.Response(status=429, text='{"detail": "busy"}', headers={"Retry-After": "3600"})

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        with pytest.raises(RateLimitError) as info:
            await c.generate("hi")
    assert rec.posts == 1
    assert info.value.retry_after == 3600
    assert info.value.status_code == 429
    assert "retry after 3600s" in str(info.value)


async def test_5xx_then_success(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()
    statuses = [502, 503, 504]

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if statuses:
            return web.Response(status=statuses.pop(0), text="modal-http: upstream")
        return reply("finally")

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT, max_retries=3) as c:
        assert await c.generate("hi") == "finally"
    assert rec.posts == 4


async def test_persistent_5xx_reports_exact_attempts(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        return web.Response(status=500, text="modal-http: internal error: function execution")

    url = await make_endpoint(handler)
    async with AsyncClient(url, retry=dataclasses.replace(NO_WAIT, max_retries=2)) as c:
        with pytest.raises(ServerError) as info:
            await c.generate("hi")
    assert rec.posts == 3
    err = info.value
    assert err.attempts == 3
    assert err.status_code == 500
    assert str(err).startswith("500 Internal Server Error from http://127.0.0.1:")
    assert "after 3 attempts: modal-http: internal error" in str(err)
    assert [h["X-Modal-LLM-Attempt"] for h in rec.headers] == ["1", "2", "3"]


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, '{"detail": "bad request"}', StatusError),
        (401, "modal-http: missing credentials for proxy authorization", AuthenticationError),
        (403, "forbidden", AuthenticationError),
        (404, "modal-http: invalid function call", StatusError),
        (422, '{"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}', StatusError),
    ],
)
async def test_client_errors_are_not_retried(
    make_endpoint: MakeEndpoint, status: int, body: str, cls: type[StatusError]
) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        return web.Response(status=status, text=body)

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        with pytest.raises(cls) as info:
            await c.generate("hi")
    assert type(info.value) is cls
    assert rec.posts == 1
    assert info.value.status_code == status
    assert info.value.attempts == 1
    assert body[:50] in str(info.value)


async def test_connection_reset_before_response_is_retried(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if rec.posts == 1:
            assert request.transport is not None
            request.transport.close()  # drop the connection without answering
            raise web.HTTPInternalServerError()  # never sent: the socket is gone
        return reply("recovered")

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        assert await c.generate("hi") == "recovered"
    assert rec.posts == 2


async def test_unreachable_endpoint_is_a_connect_error() -> None:
    # Bind a port, then close it, so nothing listens there.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with AsyncClient(
        f"http://127.0.0.1:{port}/", retry=dataclasses.replace(NO_WAIT, max_retries=1)
    ) as c:
        with pytest.raises(ConnectError) as info:
            await c.generate("hi")
    assert info.value.attempts == 2
    assert "cannot connect" in str(info.value)


# -- timeouts --


async def test_hang_longer_than_first_byte_timeout(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        await release.wait()
        return reply("too late")

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, timeout=Timeout(first_byte=0.2), max_retries=0) as c:
            with pytest.raises(EndpointTimeoutError) as info:
                await c.generate("hi")
    finally:
        release.set()
    assert info.value.phase == "first_byte"
    assert isinstance(info.value, TimeoutError)
    assert rec.posts == 1


async def test_first_byte_timeout_is_retried(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if rec.posts == 1:
            await release.wait()
        return reply("second try")

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, timeout=Timeout(first_byte=0.2), retry=NO_WAIT) as c:
            assert await c.generate("hi") == "second try"
    finally:
        release.set()
    assert rec.posts == 2


async def test_deadline_bounds_the_whole_call(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    # Every attempt fails fast with 503 and backoff is 0.2 s; the 0.3 s deadline stops it.
    policy = dataclasses.replace(NO_WAIT, wait_initial=0.2, wait_max=0.2, max_retries=50)
    url = await make_endpoint(handler)
    async with AsyncClient(url, retry=policy, timeout=Timeout(deadline=0.3)) as c:
        with pytest.raises(ModalLLMError) as info:
            await c.generate("hi")
    err = info.value
    assert isinstance(err, (ServerError, EndpointTimeoutError))
    assert err.attempts is None or err.attempts < 50


async def test_per_call_timeout_override(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return reply("late")

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, max_retries=0) as c:
            with pytest.raises(EndpointTimeoutError) as info:
                await c.generate("hi", timeout=0.2)
    finally:
        release.set()
    assert info.value.phase == "first_byte"


def test_timeout_values() -> None:
    assert Timeout(5.0) == Timeout(connect=5.0, first_byte=5.0, read=5.0)
    assert Timeout(5.0).deadline is None
    assert Timeout(5.0, first_byte=60).first_byte == 60.0
    assert Timeout(None).connect is None
    assert Timeout().replace(deadline=10).deadline == 10.0
    assert "first_byte=600.0" in repr(Timeout())
    with pytest.raises(ConfigError):
        Timeout(-1)
    with pytest.raises(ConfigError):
        Timeout(connect="soon")  # type: ignore[arg-type]


# -- Modal's 303 result-URL chain ---------------------------------------------------------------


def result_chain(hops: int, rec: Recorder, work: list[int], fail_poll: int = 0) -> Any:
    """A Modal-like endpoint: POST answers 303; each GET answers 303 until ``hops`` polls."""
    polls = {"n": 0, "failed": 0}

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        if request.method == "POST":
            work.append(1)  # the GPU work starts exactly here
            raise web.HTTPSeeOther(location="/gen?__modal_function_call_id=fc-01ABC")
        assert request.query["__modal_function_call_id"] == "fc-01ABC"
        if polls["failed"] < fail_poll:
            polls["failed"] += 1
            return web.Response(status=503, text="modal-http: poll failed")
        polls["n"] += 1
        if polls["n"] < hops:
            raise web.HTTPSeeOther(location="/gen?__modal_function_call_id=fc-01ABC")
        return reply("slow result")

    return handler


async def test_303_chain_is_followed_with_get_and_post_sent_once(
    make_endpoint: MakeEndpoint,
) -> None:
    rec, work = Recorder(), []
    url = await make_endpoint(result_chain(12, rec, work), path="/gen")
    async with AsyncClient(url, modal_key=KEY, modal_secret=SECRET) as c:
        assert await c.generate("long job") == "slow result"
    assert rec.posts == 1
    assert len(work) == 1
    assert rec.gets == 12  # beyond aiohttp's default of 10 redirects
    # Same origin: the credentials follow the chain.
    assert all(h.get("Modal-Key") == KEY for h in rec.headers)


async def test_failed_poll_is_retried_as_a_poll(make_endpoint: MakeEndpoint) -> None:
    rec, work = Recorder(), []
    url = await make_endpoint(result_chain(2, rec, work, fail_poll=2), path="/gen")
    async with AsyncClient(url, retry=NO_WAIT) as c:
        assert await c.generate("long job") == "slow result"
    assert rec.posts == 1
    assert len(work) == 1
    assert rec.gets == 4  # 2 failed polls + 2 successful hops


async def test_hops_run_out_then_resume(make_endpoint: MakeEndpoint) -> None:
    rec, work = Recorder(), []
    url = await make_endpoint(result_chain(6, rec, work), path="/gen")
    async with AsyncClient(url, max_redirects=3) as c:
        with pytest.raises(ResultPendingError) as info:
            await c.generate("long job")
        result_url = info.value.result_url
        assert "__modal_function_call_id=fc-01ABC" in result_url
        assert "fc-01ABC" in str(info.value)
        completion = await c.resume(result_url)
    assert completion.text == "slow result"
    assert rec.posts == 1 and len(work) == 1


async def test_resume_has_its_own_hop_budget(make_endpoint: MakeEndpoint) -> None:
    rec, work = Recorder(), []
    url = await make_endpoint(result_chain(12, rec, work), path="/gen")
    async with AsyncClient(url, max_redirects=2) as c:
        with pytest.raises(ResultPendingError) as info:
            await c.generate("long job")
        with pytest.raises(ResultPendingError) as again:  # the client's budget: 2 more hops
            await c.resume(info.value.result_url)
        assert again.value.hops == 2
        completion = await c.resume(again.value.result_url, max_redirects=20)
        with pytest.raises(ConfigError, match="max_redirects"):
            await c.resume(again.value.result_url, max_redirects=0)
    assert completion.text == "slow result"
    assert rec.posts == 1 and len(work) == 1


async def test_cross_origin_redirect_gets_no_credentials(make_endpoint: MakeEndpoint) -> None:
    other = Recorder()

    async def elsewhere(request: web.Request) -> web.Response:
        await other.record(request)
        return reply("from elsewhere")

    other_url = await make_endpoint(elsewhere, path="/result")

    async def origin(request: web.Request) -> web.Response:
        raise web.HTTPSeeOther(location=other_url + "?__modal_function_call_id=fc-x")

    url = await make_endpoint(origin)
    async with AsyncClient(
        url, modal_key=KEY, modal_secret=SECRET, headers={"Authorization": "Bearer wk.ws"}
    ) as c:
        assert await c.generate("hi") == "from elsewhere"
    seen = {k.lower() for k in other.headers[0]}
    assert not {"modal-key", "modal-secret", "authorization"} & seen
    assert other.gets == 1


async def test_307_is_not_followed(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        await rec.record(request)
        raise web.HTTPTemporaryRedirect(location="/elsewhere")

    async with AsyncClient(await make_endpoint(handler)) as c:
        with pytest.raises(RedirectError, match="re-send the prompt"):
            await c.generate("hi")
    assert rec.posts == 1


# -- concurrency, cancellation, lifecycle ---------------------------------------------------------


async def test_concurrency_limit_is_never_exceeded(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()
    full = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        rec.in_flight += 1
        rec.max_in_flight = max(rec.max_in_flight, rec.in_flight)
        if rec.in_flight == 4:
            full.set()
        try:
            # Hold each request until the limit has been reached once, so overlap is real.
            await asyncio.wait_for(full.wait(), 2)
            await asyncio.sleep(0)
        finally:
            rec.in_flight -= 1
        return reply(request.path)

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_concurrency=4) as c:
        results = await c.generate_many([f"p{i}" for i in range(40)])
    assert len(results) == 40
    assert rec.max_in_flight == 4


async def test_generate_many_keeps_order_and_isolates_failures(
    make_endpoint: MakeEndpoint,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        if prompt == "bad":
            return web.Response(status=400, text="no")
        await asyncio.sleep(0.001 * (10 - int(prompt[1:])))  # finish out of order
        return reply(prompt.upper())

    prompts = ["p1", "p2", "bad", "p3", "p9"]
    async with AsyncClient(await make_endpoint(handler), max_concurrency=8) as c:
        results = await c.generate_many(prompts, return_exceptions=True)
        assert results[:2] == ["P1", "P2"]
        assert isinstance(results[2], StatusError)
        assert results[3:] == ["P3", "P9"]
        with pytest.raises(StatusError):
            await c.generate_many(prompts)


async def test_cancelling_an_in_flight_call_releases_the_connection(
    make_endpoint: MakeEndpoint,
) -> None:
    entered, gone = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if (await request.json())["prompt"] == "hang":
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                gone.set()  # aiohttp cancels the handler when the client disconnects
                raise
        return reply("next")

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_concurrency=1) as c:
        task = asyncio.ensure_future(c.generate("hang"))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(gone.wait(), 5)
        # The single slot and the pool are free again.
        assert await c.generate("after") == "next"


async def test_closed_client_raises_a_sentence(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("x")

    c = AsyncClient(await make_endpoint(handler))
    assert await c.generate("a") == "x"
    await c.aclose()
    await c.aclose()  # idempotent
    with pytest.raises(ClientClosedError, match="Cannot use a closed client"):
        await c.generate("b")


def test_client_from_another_loop_fails_clearly(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("x")

    async def scenario() -> None:
        url = await make_endpoint(handler)  # type: ignore[misc]
        assert url

    client = AsyncClient("http://127.0.0.1:9/")

    async def use() -> None:
        client._session_for_loop()

    loop_a = asyncio.new_event_loop()
    loop_b = asyncio.new_event_loop()
    try:
        loop_a.run_until_complete(use())
        with pytest.raises(ClientClosedError, match="another event loop"):
            loop_b.run_until_complete(use())
        loop_a.run_until_complete(client.aclose())
    finally:
        loop_a.close()
        loop_b.close()
    del scenario


async def test_unclosed_client_warns_without_secrets(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("x")

    url = await make_endpoint(handler)
    c = AsyncClient(url, modal_key=KEY, modal_secret=SECRET)
    assert await c.generate("a") == "x"
    session = c._session
    assert session is not None
    with pytest.warns(ResourceWarning, match="was never closed") as record:
        c.__del__()
    assert all(KEY not in str(w.message) for w in record)
    await c.aclose()
    assert session.closed


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


# -- configuration errors --


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "no endpoint URL"),
        ({"endpoint_url": "ftp://x"}, "http"),
        ({"endpoint_url": "https://u:p@x.modal.run"}, "credentials"),
        ({"endpoint_url": "https://x.modal.run", "modal_key": "k"}, "together"),
        ({"endpoint_url": "https://x.modal.run", "headers": {"X-A": "1\r\nEvil: 1"}}, "CR"),
        ({"endpoint_url": "https://x.modal.run", "max_concurrency": 0}, "max_concurrency"),
        ({"endpoint_url": "https://x.modal.run", "max_retries": -1}, "max_retries"),
        ({"endpoint_url": "https://x.modal.run", "timeout": "long"}, "timeout"),
        ({"endpoint_url": "https://x.modal.run", "bogus": 1}, "unknown option"),
    ],
)
def test_bad_configuration_is_a_config_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AsyncClient(**kwargs)


def test_credentials_over_plain_http_warn() -> None:
    with pytest.warns(UserWarning, match="plain http"):
        AsyncClient("http://example.modal.run/", modal_key="k", modal_secret="s")


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


async def test_stop_sequences_cut_generate(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("Answer: 42\n\nQuestion: next")

    async with AsyncClient(await make_endpoint(handler)) as c:
        assert await c.generate("q", stop=["\n\n"]) == "Answer: 42"
        assert await c.generate("q", stop="Question") == "Answer: 42\n\n"


async def test_no_unclosed_session_after_many_calls(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("x")

    url = await make_endpoint(handler)
    for _ in range(3):
        async with AsyncClient(url) as c:
            await c.generate_many(["a"] * 10)
    gc.collect()  # with filterwarnings=error, a leaked session would fail here


def test_aiohttp_is_hidden() -> None:
    # No aiohttp exception class is part of our error tree.
    assert not issubclass(ModalLLMError, aiohttp.ClientError)
    assert issubclass(EndpointTimeoutError, TimeoutError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(RetryPolicy, object)


async def test_body_stall_is_a_read_timeout_not_retried(make_endpoint: MakeEndpoint) -> None:
    rec = Recorder()
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await rec.record(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 40
        await resp.prepare(request)
        await resp.write(b'{"prompt": "half')
        await release.wait()
        return resp

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, timeout=Timeout(read=0.2), retry=NO_WAIT) as c:
            with pytest.raises(EndpointTimeoutError) as info:
                await c.generate("hi")
    finally:
        release.set()
    assert info.value.phase == "read"
    assert rec.posts == 1


async def test_map_yields_batch_results(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if body["prompt"] == "bad":
            return web.Response(status=400, text="no")
        return reply(body["prompt"].upper() + str(body.get("n", "")))

    items = ["a", {"prompt": "b", "id": "x", "n": 2}, "bad"]
    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as c:
        results = [r async for r in c.map(iter(items), ordered=True)]
    assert [r.text for r in results] == ["A", "B2", None]
    assert [r.id for r in results] == [0, "x", 2]
    assert isinstance(results[2].error, StatusError)
    assert results[0].attempts == 1


async def test_first_byte_watch_composes_with_outer_timeouts(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if (await request.json())["prompt"] == "slow":
            await release.wait()
        return reply("fast")

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, timeout=Timeout(first_byte=0.2), max_retries=0) as c:
            outer = getattr(asyncio, "timeout", None)  # Python 3.11+
            with pytest.raises(EndpointTimeoutError):
                if outer is None:
                    await c.generate("slow")
                else:
                    async with outer(5):
                        await c.generate("slow")
            task = asyncio.current_task()
            assert task is not None
            assert getattr(task, "cancelling", lambda: 0)() == 0  # our cancel was undone
            # The task is healthy: later awaits are not cancelled, and calls still work.
            await asyncio.sleep(0)
            assert await c.generate("quick") == "fast"
    finally:
        release.set()


async def test_first_byte_watch_buckets() -> None:
    from modal_llm._watch import FirstByteWatch

    loop = asyncio.get_running_loop()
    watch = FirstByteWatch(loop)
    never = asyncio.Event()
    waiter = asyncio.ensure_future(never.wait())
    other = asyncio.ensure_future(never.wait())
    a = watch.start(0.05, waiter)  # type: ignore[arg-type]
    b = watch.start(0.05, other)  # type: ignore[arg-type]
    watch.stop(b, other)  # the first byte arrived for this one
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert watch.expired(waiter)  # type: ignore[arg-type]
    assert not watch.expired(waiter)  # consumed
    assert not other.done()
    other.cancel()
    assert a >= loop.time() - 1


async def test_stalled_error_body_is_a_read_timeout(make_endpoint: MakeEndpoint) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=503, headers={"Content-Type": "text/plain"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b"modal-http: serv")
        await release.wait()
        return resp

    url = await make_endpoint(handler)
    try:
        async with AsyncClient(url, timeout=Timeout(read=0.2), max_retries=0) as c:
            with pytest.raises(EndpointTimeoutError) as info:
                await c.generate("hi")
    finally:
        release.set()
    assert info.value.phase == "read"
