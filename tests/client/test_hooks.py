"""Attempt events: ``event_hooks`` on the client and the per-call ``on_attempt`` seam."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    AttemptEvent,
    Client,
    ConfigError,
    ConnectError,
    ServerError,
    StatusError,
)
from modal_llm._unary import completion_of

from ..conftest import NO_WAIT, MakeEndpoint

KEY, SECRET = "wk-hook-key-123", "ws-hook-secret-456"


def scripted(*replies: Any) -> Any:
    """A handler answering each request with the next reply (a status or a text)."""
    queue = list(replies)

    async def handler(request: web.Request) -> web.StreamResponse:
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, web.StreamResponse):
            return item
        if isinstance(item, int):
            return web.Response(status=item, headers={"Retry-After": "0"}, text="busy")
        return web.json_response({"prompt": item})

    return handler


def hooks() -> tuple[list[AttemptEvent], list[AttemptEvent], dict[str, list[Any]]]:
    seen: list[AttemptEvent] = []
    failed: list[AttemptEvent] = []
    return seen, failed, {"attempt": [seen.append], "failure": [failed.append]}


async def test_every_attempt_is_seen_after_the_retry_decision(make_endpoint: MakeEndpoint) -> None:
    seen, failed, event_hooks = hooks()
    url = await make_endpoint(scripted(503, "ok"))
    async with AsyncClient(url, retry=NO_WAIT, event_hooks=event_hooks) as c:
        assert await c.generate("hi") == "ok"
    first, second = seen
    assert (first.attempt, first.status, first.will_retry, first.wait) == (1, 503, True, 0.0)
    assert isinstance(first.error, ServerError) and first.retry_after and not first.stream
    assert (second.attempt, second.status, second.error, second.will_retry) == (2, 200, None, False)
    assert second.wait is None and not second.retry_after
    assert second.elapsed >= 0 and first.elapsed >= 0
    assert failed == [first]


async def test_a_final_failure_is_one_event_without_retry(make_endpoint: MakeEndpoint) -> None:
    seen, failed, event_hooks = hooks()
    url = await make_endpoint(scripted(500))
    policy = dataclasses.replace(NO_WAIT, max_retries=1)
    async with AsyncClient(url, retry=policy, event_hooks=event_hooks) as c:
        with pytest.raises(ServerError) as info:
            await c.generate("hi")
    assert [(e.attempt, e.status, e.will_retry) for e in seen] == [(1, 500, True), (2, 500, False)]
    assert seen[-1].error is info.value and info.value.attempts == 2
    assert failed == seen


async def test_polls_and_transport_errors_are_attempts(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.method == "POST":
            raise web.HTTPSeeOther(location="/result")
        return web.json_response({"prompt": "done"})

    seen, _, event_hooks = hooks()
    async with AsyncClient(await make_endpoint(handler), event_hooks=event_hooks) as c:
        assert await c.generate("hi") == "done"
    assert [(e.attempt, e.status) for e in seen] == [(1, 303), (2, 200)]

    seen.clear()
    async with AsyncClient("http://127.0.0.1:9/", max_retries=0, event_hooks=event_hooks) as c:
        with pytest.raises(ConnectError):
            await c.generate("hi")
    assert [(e.status, type(e.error)) for e in seen] == [(None, ConnectError)]


async def test_a_stream_opening_is_an_attempt(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"prompt": "a"}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    seen, _, event_hooks = hooks()
    url = await make_endpoint(handler)
    async with AsyncClient(url, event_hooks=event_hooks) as c, c.stream("hi") as pieces:
        assert [p async for p in pieces] == ["a"]
    assert [(e.attempt, e.status, e.stream, e.error) for e in seen] == [(1, 200, True, None)]


async def test_the_event_error_is_masked(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=400, text=f"bad key {request.headers['Modal-Key']}")

    seen, _, event_hooks = hooks()
    url = await make_endpoint(handler)
    async with AsyncClient(url, modal_key=KEY, modal_secret=SECRET, event_hooks=event_hooks) as c:
        with pytest.raises(StatusError):
            await c.generate("hi")
    assert seen[0].error is not None and KEY not in str(seen[0].error)


async def test_a_hook_that_raises_is_logged_and_ignored(
    make_endpoint: MakeEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: AttemptEvent) -> None:
        raise RuntimeError("observer bug")

    url = await make_endpoint(scripted("ok"))
    with caplog.at_level(logging.ERROR, logger="modal_llm"):
        async with AsyncClient(url, event_hooks={"attempt": [broken]}) as c:
            assert await c.generate("hi") == "ok"
    assert "event hook" in caplog.text and "observer bug" in caplog.text


async def test_per_call_observer_seam(make_endpoint: MakeEndpoint) -> None:
    """``_complete(..., on_attempt=)``: what ``map`` builds its send callable from."""
    seen, _, event_hooks = hooks()
    mine: list[AttemptEvent] = []
    url = await make_endpoint(scripted(429, "ok"))
    async with AsyncClient(url, retry=NO_WAIT, event_hooks=event_hooks) as c:
        completion, attempts = await c._complete(
            "hi", None, 5.0, {}, completion_of, on_attempt=mine.append
        )
        assert completion.text == "ok" and attempts == 2
        assert await c.generate("again") == "ok"  # the per-call observer is not kept
    assert [e.status for e in mine] == [429, 200]
    assert [e.status for e in seen] == [429, 200, 200]


def test_the_blocking_client_takes_event_hooks(make_endpoint: Any) -> None:
    from modal_llm.testing import LocalEndpoint

    seen: list[AttemptEvent] = []
    with (
        LocalEndpoint() as endpoint,
        Client(endpoint.url, event_hooks={"attempt": [seen.append]}) as c,
    ):
        assert c.generate("hi")
    assert [e.status for e in seen] == [200]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"bogus": []}, "unknown event hook kind 'bogus'"),
        ({"attempt": [42]}, "not callable"),
        ({"attempt": print}, "list of callables"),
        ([print], "mapping"),
    ],
)
def test_bad_event_hooks_are_config_errors(value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AsyncClient("https://x.modal.run", event_hooks=value)
