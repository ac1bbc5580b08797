"""Modal's 303 result-URL chain: GET polls, hop budgets, resume, credentials per origin."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    ConfigError,
    RedirectError,
    ResultPendingError,
)

from ..conftest import NO_WAIT, MakeEndpoint
from .helpers import KEY, SECRET, Recorder, reply


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


MALFORMED_LOCATIONS = [
    ("http://" + "a" * 64 + ".example/r", "a label is over 63 characters"),
    ("http://a\x80b.example/r", "IDNA cannot encode it"),
    ("http://[::1/r", ""),  # urljoin itself refuses these two
    ("http://host:99999/r", ""),
    ("http://exa mple.com/r", "no whitespace or control chars"),
]


@pytest.mark.parametrize(("location", "problem"), MALFORMED_LOCATIONS)
async def test_a_malformed_location_is_a_redirect_error(
    make_endpoint: MakeEndpoint, location: str, problem: str
) -> None:
    """Review R7: a Location the endpoint URL's rules refuse is a RedirectError saying why,
    from generate and stream alike, never the UnicodeError or ValueError aiohttp meets."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(status=303)
        response.headers["Location"] = location
        return response

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as client:
        with pytest.raises(RedirectError, match="redirect to a malformed URL") as caught:
            await client.generate("hi")
        assert problem in str(caught.value)
        with pytest.raises(RedirectError, match="redirect to a malformed URL"):
            async for _ in client.stream("hi"):
                pass


async def test_a_poll_that_fails_past_its_retries_is_result_pending() -> None:
    """Review R13: every GET of the result URL answering 503 past the retries ended the
    call with a plain ServerError (no result URL, retryable): a job-level retry re-sent the
    prompt and paid for the work twice. Now ResultPendingError, resumable, from generate
    and stream alike; the poll's error is its cause."""
    from modal_llm import RetryPolicy, ServerError, is_retryable
    from modal_llm.testing import local_endpoint

    fast = RetryPolicy(max_retries=2, wait_initial=0, wait_max=0, jitter=0)
    async with (
        local_endpoint(
            work_time=0.5, hop_time=0.05, poll_error_every=1, error_status=503
        ) as endpoint,
        AsyncClient(endpoint.url, retry=fast) as client,
    ):
        with pytest.raises(ResultPendingError, match="polling the result URL failed") as got:
            await client.generate("expensive")
        error = got.value
        assert isinstance(error.__cause__, ServerError)
        assert "after 3 attempts (ServerError: 503" in str(error)
        assert error.attempts == 1  # the POST's, as every error of the call says
        assert not is_retryable(error, fast)
        endpoint.configure(poll_error_every=0)
        done = await client.resume(error.result_url)
        assert done.text and len(endpoint.posts) == 1  # the POST was never re-sent


async def test_a_stream_whose_poll_fails_past_its_retries_is_result_pending(
    make_endpoint: MakeEndpoint,
) -> None:
    gets = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal gets
        if request.method == "POST":
            raise web.HTTPSeeOther(location="/?__modal_function_call_id=fc-busy")
        gets += 1
        raise web.HTTPServiceUnavailable(text="busy")

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as client:
        with pytest.raises(ResultPendingError, match="polling the result URL failed") as got:
            async for _ in client.stream("hi"):
                pass
    assert got.value.result_url.endswith("/?__modal_function_call_id=fc-busy")
    assert gets == 1 + NO_WAIT.max_retries


async def test_a_poll_answered_404_is_the_calls_answer(make_endpoint: MakeEndpoint) -> None:
    """An expired result (404 on the result URL) is not pending: it stays a StatusError."""
    from modal_llm import StatusError

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            raise web.HTTPSeeOther(location="/?__modal_function_call_id=fc-gone")
        raise web.HTTPNotFound(text="no such function call")

    async with AsyncClient(await make_endpoint(handler), retry=NO_WAIT) as client:
        with pytest.raises(StatusError) as got:
            await client.generate("hi")
    assert got.value.status_code == 404 and not isinstance(got.value, ResultPendingError)
