"""The reference endpoint, driven by a plain aiohttp client over loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from modal_llm._exceptions import ConfigError
from modal_llm.server import (
    CONFIG,
    ENDPOINT,
    INVALID_CALL,
    INVALID_CREDENTIALS,
    MISSING_CREDENTIALS,
    RESULT_QUERY,
    STATS,
    ServerConfig,
    ServerStats,
    StreamReply,
    build_parser,
    config_from_args,
    create_app,
    main,
    serve,
    split_pieces,
    toy_generate,
)

PROMPT = "Identify yourself, bot!"
REPLY = toy_generate(PROMPT)
REPO = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def running(config: ServerConfig | None = None) -> AsyncIterator[tuple[str, ServerStats]]:
    app = create_app(config)
    async with serve(app) as url:
        yield url, app[STATS]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post_status(session: aiohttp.ClientSession, url: str, **body: Any) -> int:
    async with session.post(url, json={"prompt": PROMPT, **body}) as resp:
        await resp.read()
        return resp.status


async def first_chunk(resp: aiohttp.ClientResponse) -> bytes:
    # Bounded, so that a server that fails to flush fails the test instead of hanging it.
    return await asyncio.wait_for(resp.content.readany(), 10)


async def read_into(resp: aiohttp.ClientResponse, chunks: list[bytes]) -> None:
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)


def sse_events(raw: bytes) -> list[bytes]:
    return [event for event in raw.split(b"\n\n") if event]


# --- the toy generator ------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, "", "  ", "a", "ünïcödé ✓ words 🤖", "x\ny\tz"])
def test_toy_generate_is_deterministic_and_does_not_echo(prompt: str) -> None:
    text = toy_generate(prompt)
    assert text == toy_generate(prompt)
    assert text.startswith("🤖 toy reply")
    if len(prompt.strip()) > 1:
        assert prompt not in text
    assert toy_generate(prompt, echo_prompt=True).startswith(prompt)


def test_toy_generate_reverses_upper_cased_words() -> None:
    assert REPLY == "🤖 toy reply — BOT! YOURSELF, IDENTIFY ✓"


@pytest.mark.parametrize(
    ("text", "pieces", "count"), [(REPLY, 8, 8), (REPLY, 1, 1), ("abc", 8, 3), ("", 4, 1)]
)
def test_split_pieces_concatenate_to_the_text(text: str, pieces: int, count: int) -> None:
    parts = split_pieces(text, pieces)
    assert "".join(parts) == text
    assert len(parts) == count
    assert all(parts) or text == ""


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pieces": 0},
        {"latency": -1.0},
        {"hop_time": 0.0},
        {"stream_format": "xml"},
        {"rate_limit_rate": 1.5},
        {"failure_rate": -0.1},
        {"error_burst": -1},
        {"error_status": 200},
        {"modal_key": "wk-1"},
        {"modal_secret": "ws-1"},
        {"stream_drop_after": -1},
        {"stream_flag": ""},
    ],
)
def test_bad_config_raises_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ServerConfig(**kwargs)


def test_config_repr_hides_credentials() -> None:
    config = ServerConfig(modal_key="wk-visible", modal_secret="ws-hidden-secret")
    assert "ws-hidden-secret" not in repr(config)
    assert "wk-visible" not in repr(config)


# --- the plain contract -----------------------------------------------------------------


async def test_plain_reply_follows_the_contract(session: aiohttp.ClientSession) -> None:
    async with running() as (url, stats):
        async with session.post(url, json={"prompt": PROMPT, "max_tokens": 5}) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            data = await resp.json()
        assert data["prompt"] == REPLY
        assert data["usage"] == {"prompt_chars": len(PROMPT), "completion_chars": len(REPLY)}
        assert list(stats.bodies) == [{"prompt": PROMPT, "max_tokens": 5}]
        assert stats.generations_started == stats.generations_finished == 1


async def test_any_path_is_the_endpoint(session: aiohttp.ClientSession) -> None:
    async with (
        running() as (url, _),
        session.post(url + "some/path", json={"prompt": "a b"}) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["prompt"] == toy_generate("a b")


async def test_echo_prompt(session: aiohttp.ClientSession) -> None:
    async with (
        running(ServerConfig(echo_prompt=True)) as (url, _),
        session.post(url, json={"prompt": PROMPT}) as resp,
    ):
        assert (await resp.json())["prompt"] == f"{PROMPT} {REPLY}"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_other_methods_get_405_like_fastapi(
    session: aiohttp.ClientSession, method: str
) -> None:
    async with running() as (url, _), session.request(method, url) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert await resp.json() == {"detail": "Method Not Allowed"}


JSON = "application/json"


@pytest.mark.parametrize(
    ("body", "content_type", "errors"),
    [
        (b"", JSON, [("missing", ["body"])]),
        (b"not json", JSON, [("json_invalid", ["body", 0])]),
        (b'{"prompt": ', JSON, [("json_invalid", ["body", 11])]),
        (b"[1, 2]", JSON, [("model_attributes_type", ["body"])]),
        (b"null", JSON, [("model_attributes_type", ["body"])]),
        (b'"text"', JSON, [("model_attributes_type", ["body"])]),
        (b"{}", JSON, [("missing", ["body", "prompt"])]),
        (b'{"prompt": 3}', JSON, [("string_type", ["body", "prompt"])]),
        (b'{"prompt": null}', JSON, [("string_type", ["body", "prompt"])]),
        (b'{"prompt": "x", "stream": "maybe"}', JSON, [("bool_parsing", ["body", "stream"])]),
        (b'{"prompt": "x", "stream": []}', JSON, [("bool_type", ["body", "stream"])]),
        (b'{"prompt": "x", "format": "xml"}', JSON, [("literal_error", ["body", "format"])]),
        (
            b'{"stream": "maybe"}',
            JSON,
            [("missing", ["body", "prompt"]), ("bool_parsing", ["body", "stream"])],
        ),
        # FastAPI reads JSON only from a JSON content type.
        (b'{"prompt": "x"}', "text/plain", [("model_attributes_type", ["body"])]),
    ],
)
async def test_invalid_bodies_get_fastapi_422(
    session: aiohttp.ClientSession,
    body: bytes,
    content_type: str,
    errors: list[tuple[str, list[object]]],
) -> None:
    async with running() as (url, stats):
        async with session.post(url, data=body, headers={"Content-Type": content_type}) as resp:
            assert resp.status == 422
            assert resp.content_type == "application/json"
            detail = (await resp.json())["detail"]
        assert [(e["type"], e["loc"]) for e in detail] == errors
        assert all(isinstance(e["msg"], str) and "input" in e for e in detail)
        assert stats.generations_started == 0
        assert stats.statuses == {422: 1}


async def test_json_content_type_variants_are_accepted(session: aiohttp.ClientSession) -> None:
    async with running() as (url, _):
        for content_type in ["application/json; charset=utf-8", "application/vnd.x+json"]:
            headers = {"Content-Type": content_type}
            async with session.post(url, data=b'{"prompt": "x"}', headers=headers) as resp:
                assert resp.status == 200


async def test_body_that_is_not_utf8_gets_400(session: aiohttp.ClientSession) -> None:
    async with running() as (url, stats):
        headers = {"Content-Type": JSON}
        async with session.post(url, data=b'{"prompt": "\xff"}', headers=headers) as resp:
            assert resp.status == 400
            assert await resp.json() == {"detail": "There was an error parsing the body"}
        assert stats.bodies[-1] == b'{"prompt": "\xff"}'


# --- proxy auth -------------------------------------------------------------------------

AUTH = ServerConfig(modal_key="wk-test", modal_secret="ws-test")


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, MISSING_CREDENTIALS),
        ({"Modal-Key": "wk-test"}, 401, MISSING_CREDENTIALS),
        ({"Modal-Secret": "ws-test"}, 401, MISSING_CREDENTIALS),
        ({"Modal-Key": "wk-test", "Modal-Secret": "wrong"}, 401, INVALID_CREDENTIALS),
        ({"Modal-Key": "wrong", "Modal-Secret": "ws-test"}, 401, INVALID_CREDENTIALS),
        ({"Modal-Key": "wk-test", "Modal-Secret": "ws-test"}, 200, None),
    ],
)
async def test_proxy_auth(
    session: aiohttp.ClientSession, headers: dict[str, str], status: int, message: str | None
) -> None:
    async with running(AUTH) as (url, stats):
        async with session.post(url, json={"prompt": PROMPT}, headers=headers) as resp:
            assert resp.status == status
            if message is not None:
                assert resp.content_type == "text/plain"
                assert await resp.text() == message
            else:
                assert (await resp.json())["prompt"] == REPLY
        assert stats.generations_started == (1 if status == 200 else 0)


async def test_auth_off_ignores_credentials(session: aiohttp.ClientSession) -> None:
    async with running() as (url, stats):
        headers = {"Modal-Key": "anything"}
        async with session.post(url, json={"prompt": PROMPT}, headers=headers) as resp:
            assert resp.status == 200
        assert stats.last_headers["modal-key"] == "anything"
        assert "anything" not in repr(stats)


# --- faults -----------------------------------------------------------------------------


async def test_every_nth_post_is_rate_limited_with_retry_after(
    session: aiohttp.ClientSession,
) -> None:
    async with running(ServerConfig(rate_limit_every=3, retry_after="2")) as (url, stats):
        statuses = []
        for _ in range(6):
            async with session.post(url, json={"prompt": PROMPT}) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert resp.headers["Retry-After"] == "2"
                    assert resp.content_type == "text/plain"
                    assert (await resp.text()).startswith("modal-http:")
                else:
                    assert "Retry-After" not in resp.headers
        assert statuses == [200, 200, 429, 200, 200, 429]
        assert stats.statuses == {200: 4, 429: 2}
        assert stats.generations_started == 4


async def test_retry_after_can_be_an_http_date(session: aiohttp.ClientSession) -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    async with (
        running(ServerConfig(rate_limit_rate=1.0, retry_after=date)) as (url, _),
        session.post(url, json={"prompt": PROMPT}) as resp,
    ):
        assert resp.status == 429
        assert resp.headers["Retry-After"] == date


async def test_rate_limit_without_retry_after(session: aiohttp.ClientSession) -> None:
    async with (
        running(ServerConfig(rate_limit_rate=1.0)) as (url, _),
        session.post(url, json={"prompt": PROMPT}) as resp,
    ):
        assert resp.status == 429
        assert "Retry-After" not in resp.headers


async def test_error_burst_then_recovery(session: aiohttp.ClientSession) -> None:
    async with running(ServerConfig(error_burst=2, error_status=502)) as (url, stats):
        statuses = [await post_status(session, url) for _ in range(4)]
        assert statuses == [502, 502, 200, 200]
        assert stats.generations_started == 2


async def test_error_burst_default_status_and_body(session: aiohttp.ClientSession) -> None:
    async with (
        running(ServerConfig(error_burst=1)) as (url, _),
        session.post(url, json={"prompt": PROMPT}) as resp,
    ):
        assert resp.status == 503
        assert resp.content_type == "text/plain"
        assert await resp.text() == "modal-http: service unavailable"


async def test_a_429_burst_carries_retry_after(session: aiohttp.ClientSession) -> None:
    config = ServerConfig(error_burst=1, error_status=429, retry_after="3")
    async with running(config) as (url, _):
        async with session.post(url, json={"prompt": PROMPT}) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "3"
        assert await post_status(session, url) == 200


async def test_failure_rate_one_always_fails(session: aiohttp.ClientSession) -> None:
    async with running(ServerConfig(failure_rate=1.0)) as (url, stats):
        for _ in range(3):
            async with session.post(url, json={"prompt": PROMPT}) as resp:
                assert resp.status == 500
                assert resp.content_type == "text/plain"
                assert await resp.text() == "modal-http: internal error"
        assert stats.generations_started == 0


async def test_faults_are_off_by_default(session: aiohttp.ClientSession) -> None:
    async with running() as (url, stats):
        statuses = await asyncio.gather(*(post_status(session, url) for _ in range(20)))
        assert set(statuses) == {200}
        assert stats.statuses == {200: 20}


async def fault_sequence(session: aiohttp.ClientSession, seed: int) -> list[int]:
    config = ServerConfig(rate_limit_rate=0.3, failure_rate=0.2, seed=seed)
    async with running(config) as (url, _):
        return [await post_status(session, url) for _ in range(30)]


async def test_fault_sequence_is_fixed_by_the_seed(session: aiohttp.ClientSession) -> None:
    first = await fault_sequence(session, seed=7)
    assert await fault_sequence(session, seed=7) == first
    assert set(first) == {200, 429, 500}
    assert await fault_sequence(session, seed=8) != first


# --- streaming --------------------------------------------------------------------------


def parse_stream(fmt: str, raw: bytes) -> tuple[list[str], bool]:
    """Return the pieces and whether the format's terminator was seen."""
    if fmt == "sse":
        events = sse_events(raw)
        done = events[-1] == b"data: [DONE]"
        pieces = [
            json.loads(e.removeprefix(b"data: "))["prompt"]
            for e in events
            if e.startswith(b"data: {")
        ]
        return pieces, done
    if fmt == "ndjson":
        assert raw.endswith(b"\n")
        return [json.loads(line)["prompt"] for line in raw.splitlines()], True
    return [raw.decode()], True


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        ("sse", "text/event-stream"),
        ("ndjson", "application/x-ndjson"),
        ("text", "text/plain"),
    ],
)
async def test_streams_are_incremental(
    session: aiohttp.ClientSession, fmt: str, content_type: str
) -> None:
    gate = asyncio.Event()
    async with running(ServerConfig(pieces=4, stream_format=fmt, gate=gate)) as (url, stats):
        body = {"prompt": PROMPT, "stream": True}
        async with session.post(url, json=body) as resp:
            assert resp.status == 200
            assert resp.content_type == content_type
            first = await first_chunk(resp)
            # The server is parked on the gate: this is the first piece and nothing more.
            assert not gate.is_set()
            assert stats.generations_finished == 0
            first_pieces, _ = parse_stream(fmt, first)
            assert first_pieces == split_pieces(REPLY, 4)[:1]
            gate.set()
            raw = first + await resp.read()
        pieces, done = parse_stream(fmt, raw)
        assert "".join(pieces) == REPLY
        assert done
        if fmt != "text":
            assert pieces == split_pieces(REPLY, 4)
        await stats.wait_for(lambda s: s.generations_finished == 1)
        assert stats.statuses == {200: 1}


async def test_sse_frames_exactly(session: aiohttp.ClientSession) -> None:
    async with (
        running(ServerConfig(pieces=3)) as (url, _),
        session.post(url, json={"prompt": "a b", "stream": True}) as resp,
    ):
        raw = await resp.read()
    expected = (
        'data: {"prompt":"🤖 toy "}\n\n'
        'data: {"prompt":"reply "}\n\n'
        'data: {"prompt":"— B A ✓"}\n\n'
        "data: [DONE]\n\n"
    )
    assert raw == expected.encode()


@pytest.mark.parametrize("fmt", ["sse", "ndjson", "text", "json"])
async def test_request_format_key_overrides_the_default(
    session: aiohttp.ClientSession, fmt: str
) -> None:
    other = "ndjson" if fmt == "sse" else "sse"
    async with running(ServerConfig(stream_format=other)) as (url, stats):
        body = {"prompt": PROMPT, "stream": True, "format": fmt}
        async with session.post(url, json=body) as resp:
            raw = await resp.read()
            content_type = resp.content_type
        if fmt == "json":
            assert content_type == "application/json"
            assert json.loads(raw)["prompt"] == REPLY
        else:
            assert "".join(parse_stream(fmt, raw)[0]) == REPLY
        assert stats.generations_started == 1


async def test_json_stream_format_is_a_plain_reply(session: aiohttp.ClientSession) -> None:
    async with (
        running(ServerConfig(stream_format="json")) as (url, _),
        session.post(url, json={"prompt": PROMPT, "stream": True}) as resp,
    ):
        assert resp.content_type == "application/json"
        assert (await resp.json())["prompt"] == REPLY


@pytest.mark.parametrize(("flag", "streams"), [(True, True), (False, False), ("true", True)])
async def test_stream_flag_values(
    session: aiohttp.ClientSession, flag: object, streams: bool
) -> None:
    async with (
        running() as (url, _),
        session.post(url, json={"prompt": PROMPT, "stream": flag}) as resp,
    ):
        assert (resp.content_type == "text/event-stream") is streams
        await resp.read()


async def test_stream_flag_name_is_configurable(session: aiohttp.ClientSession) -> None:
    async with running(ServerConfig(stream_flag="sse")) as (url, _):
        async with session.post(url, json={"prompt": PROMPT, "sse": True}) as resp:
            assert resp.content_type == "text/event-stream"
            await resp.read()
        async with session.post(url, json={"prompt": PROMPT, "stream": True}) as resp:
            assert resp.content_type == "application/json"


async def test_sse_keepalive_comments(session: aiohttp.ClientSession) -> None:
    async with (
        running(ServerConfig(pieces=4, sse_comment_every=2)) as (url, _),
        session.post(url, json={"prompt": PROMPT, "stream": True}) as resp,
    ):
        raw = await resp.read()
    assert sse_events(raw)[0] == b": keep-alive"
    assert raw.count(b": keep-alive\n\n") == 2
    assert "".join(parse_stream("sse", raw)[0]) == REPLY


async def test_sse_without_terminator(session: aiohttp.ClientSession) -> None:
    async with running(ServerConfig(stream_no_terminator=True)) as (url, stats):
        async with session.post(url, json={"prompt": PROMPT, "stream": True}) as resp:
            raw = await resp.read()
        pieces, done = parse_stream("sse", raw)
        assert "".join(pieces) == REPLY
        assert not done
        assert stats.disconnects == 0


@pytest.mark.parametrize(("fmt", "marker"), [("sse", b"event: error\ndata: "), ("ndjson", b"{")])
async def test_stream_error_after_n_pieces(
    session: aiohttp.ClientSession, fmt: str, marker: bytes
) -> None:
    config = ServerConfig(pieces=4, stream_format=fmt, stream_error_after=2)
    async with (
        running(config) as (url, _),
        session.post(url, json={"prompt": PROMPT, "stream": True}) as resp,
    ):
        raw = await resp.read()
    parts = sse_events(raw) if fmt == "sse" else raw.splitlines()
    assert len(parts) == 3
    assert parts[-1].startswith(marker)
    error = json.loads(parts[-1].removeprefix(marker if fmt == "sse" else b""))
    assert "error" in error
    assert b"[DONE]" not in raw


@pytest.mark.parametrize(
    ("fmt", "config_key"),
    [("sse", "stream_drop_after"), ("ndjson", "stream_drop_after"), ("text", "stream_error_after")],
)
async def test_stream_drop_mid_body(
    session: aiohttp.ClientSession, fmt: str, config_key: str
) -> None:
    fault: dict[str, Any] = {config_key: 2}
    config = ServerConfig(pieces=4, stream_format=fmt, **fault)
    async with running(config) as (url, stats):
        async with session.post(url, json={"prompt": PROMPT, "stream": True}) as resp:
            assert resp.status == 200
            chunks: list[bytes] = []
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_into(resp, chunks)
            received = b"".join(chunks)
        assert b"[DONE]" not in received
        assert stats.generations_finished == 0
        assert stats.disconnects == 0
    if fmt == "text":
        assert received == "".join(split_pieces(REPLY, 4)[:2]).encode()
    else:
        assert parse_stream(fmt, received)[0] == split_pieces(REPLY, 4)[:2]


async def test_split_utf8_cuts_inside_characters(session: aiohttp.ClientSession) -> None:
    size = len(REPLY.encode())
    gate = asyncio.Event()
    # size // 2 pieces of about 2 bytes: the first chunk ends inside the 4-byte 🤖.
    config = ServerConfig(pieces=size // 2, stream_format="text", split_utf8=True, gate=gate)
    async with (
        running(config) as (url, _),
        session.post(url, json={"prompt": PROMPT, "stream": True}) as resp,
    ):
        first = await first_chunk(resp)
        with pytest.raises(UnicodeDecodeError):
            first.decode()
        gate.set()
        raw = first + await resp.read()
    assert raw.decode() == REPLY


async def test_piece_delay_and_latency_still_deliver_everything(
    session: aiohttp.ClientSession,
) -> None:
    config = ServerConfig(pieces=3, piece_delay=0.001, latency=0.001)
    async with (
        running(config) as (url, _),
        session.post(url, json={"prompt": PROMPT, "stream": True}) as resp,
    ):
        pieces, done = parse_stream("sse", await resp.read())
    assert pieces == split_pieces(REPLY, 3)
    assert done


# --- 303 result-URL chain ---------------------------------------------------------------


async def test_303_chain_runs_the_work_once(session: aiohttp.ClientSession) -> None:
    async with running(ServerConfig(work_time=0.2, hop_time=0.05)) as (url, stats):
        async with session.post(url, json={"prompt": PROMPT}, allow_redirects=False) as resp:
            assert resp.status == 303
            location = resp.headers["Location"]
        result_url = URL(location)
        call_id = result_url.query[RESULT_QUERY]
        assert call_id.startswith("fc-")
        assert result_url.with_query(None) == URL(url)
        hops = 0
        while True:
            async with session.get(location, allow_redirects=False) as resp:
                if resp.status == 303:
                    assert resp.headers["Location"] == location
                    hops += 1
                    continue
                assert resp.status == 200
                assert (await resp.json())["prompt"] == REPLY
                break
        assert stats.posts == 1
        assert stats.gets == hops + 1
        assert stats.generations_started == 1
        # A result is handed out once.
        async with session.get(location) as resp:
            assert resp.status == 404
            assert resp.content_type == "text/plain"
            assert await resp.text() == INVALID_CALL


async def test_303_chain_followed_by_aiohttp(session: aiohttp.ClientSession) -> None:
    async with running(ServerConfig(work_time=0.1, hop_time=0.02)) as (url, stats):
        async with session.post(url + "generate", json={"prompt": PROMPT}) as resp:
            assert resp.status == 200
            assert (await resp.json())["prompt"] == REPLY
            assert resp.history[0].status == 303
            assert resp.url.path == "/generate"
        assert stats.posts == 1
        assert stats.generations_started == stats.generations_finished == 1


async def test_polls_never_restart_long_work(session: aiohttp.ClientSession) -> None:
    # The work outlives the test: closing the server must cancel it cleanly.
    async with running(ServerConfig(work_time=60.0, hop_time=0.01)) as (url, stats):
        async with session.post(url, json={"prompt": PROMPT}, allow_redirects=False) as resp:
            location = resp.headers["Location"]
        for _ in range(3):
            async with session.get(location, allow_redirects=False) as resp:
                assert resp.status == 303
                assert resp.headers["Location"] == location
        assert stats.generations_started == 1
        assert stats.generations_finished == 0
        assert stats.statuses == {303: 4}
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_unknown_call_id_is_404(session: aiohttp.ClientSession) -> None:
    async with running() as (url, _), session.get(url, params={RESULT_QUERY: "fc-nope"}) as resp:
        assert resp.status == 404
        assert await resp.text() == INVALID_CALL


async def test_poll_errors_keep_the_result(session: aiohttp.ClientSession) -> None:
    config = ServerConfig(work_time=0.05, hop_time=0.01, poll_error_every=1, error_status=502)
    async with running(config) as (url, stats):
        async with session.post(url, json={"prompt": PROMPT}, allow_redirects=False) as resp:
            location = resp.headers["Location"]
        await stats.wait_for(lambda s: s.generations_finished == 1)
        async with session.get(location) as resp:
            assert resp.status == 502
    config = ServerConfig(work_time=0.05, hop_time=0.01, poll_error_every=2)
    async with running(config) as (url, stats):
        locations = []
        for _ in range(2):
            async with session.post(url, json={"prompt": PROMPT}, allow_redirects=False) as resp:
                locations.append(resp.headers["Location"])
        await stats.wait_for(lambda s: s.generations_finished == 2)
        statuses = []
        for location in [locations[0], locations[1], locations[1], locations[1]]:
            async with session.get(location, allow_redirects=False) as resp:
                statuses.append(resp.status)
        # Poll 2 fails and leaves the result in place for poll 3; then it is gone.
        assert statuses == [200, 503, 200, 404]
        assert stats.generations_started == 2


async def test_result_url_needs_credentials_too(session: aiohttp.ClientSession) -> None:
    config = dataclasses.replace(AUTH, work_time=0.05, hop_time=0.01)
    creds = {"Modal-Key": "wk-test", "Modal-Secret": "ws-test"}
    async with running(config) as (url, _):
        async with session.post(
            url, json={"prompt": PROMPT}, headers=creds, allow_redirects=False
        ) as resp:
            location = resp.headers["Location"]
        async with session.get(location) as resp:
            assert resp.status == 401
        async with session.get(location, headers=creds) as resp:
            assert resp.status == 200


# --- cold starts, concurrency, disconnects, stats -----------------------------------------


async def test_cold_start_is_shared_by_concurrent_first_requests(
    session: aiohttp.ClientSession,
) -> None:
    async with running(ServerConfig(cold_start=0.05)) as (url, stats):
        statuses = await asyncio.gather(*(post_status(session, url) for _ in range(3)))
        assert statuses == [200, 200, 200]
        assert await post_status(session, url) == 200
        assert stats.cold_starts == 1


async def test_idle_reset_makes_the_container_cold_again(session: aiohttp.ClientSession) -> None:
    async with running(ServerConfig(cold_start=0.001, idle_reset=1e-6)) as (url, stats):
        await post_status(session, url)
        await post_status(session, url)
        assert stats.cold_starts == 2


async def test_max_in_flight_counts_concurrent_requests(session: aiohttp.ClientSession) -> None:
    gate = asyncio.Event()
    async with running(ServerConfig(gate=gate)) as (url, stats):
        tasks = [asyncio.create_task(post_status(session, url, stream=True)) for _ in range(5)]
        await stats.wait_for(lambda s: s.in_flight == 5)
        gate.set()
        assert await asyncio.gather(*tasks) == [200] * 5
        await stats.wait_for(lambda s: s.in_flight == 0)
        assert stats.max_in_flight == 5
        assert stats.requests == stats.posts == 5


async def test_client_leaving_mid_stream_is_a_disconnect(session: aiohttp.ClientSession) -> None:
    gate = asyncio.Event()
    async with running(ServerConfig(gate=gate)) as (url, stats):
        resp = await session.post(url, json={"prompt": PROMPT, "stream": True})
        await first_chunk(resp)
        resp.close()
        await stats.wait_for(lambda s: s.disconnects == 1)
        await stats.wait_for(lambda s: s.in_flight == 0)
        assert stats.generations_finished == 0


async def test_disconnect_is_noticed_at_the_next_write_without_handler_cancellation(
    session: aiohttp.ClientSession,
) -> None:
    gate = asyncio.Event()
    # Many small paced pieces: writing goes on long after the client has left.
    app = create_app(ServerConfig(gate=gate, pieces=200, piece_delay=0.001))
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        resp = await session.post(url, json={"prompt": PROMPT * 10, "stream": True})
        await first_chunk(resp)
        resp.close()
        gate.set()
        await app[STATS].wait_for(lambda s: s.disconnects == 1)
        await app[STATS].wait_for(lambda s: s.in_flight == 0)
        assert app[STATS].generations_finished == 0
    finally:
        await runner.cleanup()


async def test_client_leaving_while_waiting_is_a_disconnect(
    session: aiohttp.ClientSession,
) -> None:
    async with running(ServerConfig(latency=60.0)) as (url, stats):
        task = asyncio.create_task(post_status(session, url))
        await stats.wait_for(lambda s: s.in_flight == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stats.wait_for(lambda s: s.disconnects == 1)
        assert stats.in_flight == 0


async def test_shutdown_with_a_stream_held_is_prompt_and_not_a_disconnect(
    session: aiohttp.ClientSession,
) -> None:
    gate = asyncio.Event()  # never set
    app = create_app(ServerConfig(gate=gate))
    async with serve(app) as url:
        resp = await session.post(url, json={"prompt": PROMPT, "stream": True})
        await first_chunk(resp)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    resp.release()
    assert app[STATS].disconnects == 0
    assert app[STATS].in_flight == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_stats_record_headers_bodies_and_statuses(session: aiohttp.ClientSession) -> None:
    async with running() as (url, stats):
        for attempt in (1, 2):
            headers = {"Idempotency-Key": "k-1", "X-Modal-LLM-Attempt": str(attempt)}
            async with session.post(url, json={"prompt": "p", "n": attempt}, headers=headers):
                pass
        async with session.get(url):
            pass
        assert stats.requests == 3
        assert (stats.posts, stats.gets) == (2, 1)
        assert stats.statuses == {200: 2, 405: 1}
        assert list(stats.bodies) == [{"prompt": "p", "n": 1}, {"prompt": "p", "n": 2}]
        assert [h.get("X-Modal-LLM-Attempt") for h in stats.recent_headers] == ["1", "2", None]
        assert stats.recent_headers[0]["idempotency-key"] == "k-1"
        assert "X-Modal-LLM-Attempt" not in stats.last_headers


async def test_wait_for_times_out() -> None:
    stats = ServerStats()
    with pytest.raises(asyncio.TimeoutError):
        await stats.wait_for(lambda s: s.requests > 0, timeout=0.01)
    assert stats._waiters == []


# --- command line -----------------------------------------------------------------------


def test_parser_has_a_flag_for_every_switch() -> None:
    dests = {action.dest for action in build_parser()._actions}
    switches = {f.name for f in dataclasses.fields(ServerConfig)} - {"gate"}
    assert switches <= dests


def test_flags_build_the_config() -> None:
    args = build_parser().parse_args(
        [
            "--pieces=3",
            "--latency=0.5",
            "--rate-limit-every=4",
            "--retry-after=7",
            "--stream-format=ndjson",
            "--stream-no-terminator",
            "--modal-key=wk",
            "--modal-secret=ws",
            "--stream-drop-after=2",
        ]
    )
    assert config_from_args(args) == ServerConfig(
        pieces=3,
        latency=0.5,
        rate_limit_every=4,
        retry_after="7",
        stream_format="ndjson",
        stream_no_terminator=True,
        modal_key="wk",
        modal_secret="ws",
        stream_drop_after=2,
    )
    assert config_from_args(build_parser().parse_args([])) == ServerConfig()


def test_main_rejects_a_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--pieces", "0"]) == 2
    assert "pieces" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
async def test_module_runs_as_a_server_process(session: aiohttp.ClientSession) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modal_llm.server",
        "--port=0",
        "--pieces=2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        url = line.decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with session.post(url, json={"prompt": PROMPT, "stream": True}) as resp:
            assert parse_stream("sse", await resp.read())[0] == split_pieces(REPLY, 2)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()


async def test_text_stream_error_after_the_last_piece_drops(
    session: aiohttp.ClientSession,
) -> None:
    config = ServerConfig(pieces=4, stream_format="text", stream_error_after=4)
    chunks: list[bytes] = []
    async with (
        running(config) as (url, _),
        session.post(url, json={"prompt": PROMPT, "stream": True}) as resp,
    ):
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_into(resp, chunks)
    assert b"".join(chunks) == REPLY.encode()


async def test_requests_are_recorded_only_when_asked(session: aiohttp.ClientSession) -> None:
    plain = create_app()
    assert plain[ENDPOINT].requests is None
    app = create_app(record_requests=True)
    async with serve(app) as url:
        async with session.post(url + "p?x=1", json={"prompt": PROMPT}, headers={"X-A": "b"}):
            pass
        async with session.get(url):
            pass
    first, second = app[ENDPOINT].requests or []
    assert (first.method, first.path, first.query, first.status) == ("POST", "/p", {"x": "1"}, 200)
    assert first.body == {"prompt": PROMPT} and first.prompt == PROMPT
    assert first.headers["x-a"] == "b" and first.scripted is None
    assert (second.method, second.body, second.prompt, second.status) == ("GET", None, None, 405)
    assert first.time <= second.time


async def test_configure_restarts_the_fault_numbering(session: aiohttp.ClientSession) -> None:
    app = create_app(ServerConfig(error_burst=1))
    async with serve(app) as url:
        assert await post_status(session, url) == 503
        assert await post_status(session, url) == 200
        app[ENDPOINT].configure(ServerConfig(error_burst=1, error_status=502))
        assert await post_status(session, url) == 502
        assert await post_status(session, url) == 200
        assert app[ENDPOINT].config.error_status == 502
        assert app[CONFIG].error_status == 503  # the config it was built with


async def test_script_replaces_and_counts(session: aiohttp.ClientSession) -> None:
    app = create_app()
    script = app[ENDPOINT].script
    script.replace([429, "x"])
    with pytest.raises(ConfigError, match=r"script\[0\]"):
        script.replace([True])
    assert len(script) == 2  # a bad script changes nothing
    with pytest.raises(ConfigError, match="end"):
        StreamReply(["a"], end="later")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="strings"):
        StreamReply([1])  # type: ignore[list-item]
    async with serve(app) as url:
        assert await post_status(session, url) == 429
        assert len(script) == 1
