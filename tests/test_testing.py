"""``modal_llm.testing``: local endpoints, scripted replies, recorded requests, clean teardown."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import re
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    Client,
    ConfigError,
    ConnectError,
    EndpointTimeoutError,
    RateLimitError,
    ServerError,
    ServerStreamError,
    StreamInterruptedError,
    Timeout,
)
from modal_llm.server import INTERNAL_ERROR, MISSING_CREDENTIALS, toy_generate
from modal_llm.testing import (
    FaultConfig,
    FaultProxy,
    LocalEndpoint,
    ServerConfig,
    ServerThread,
    StreamReply,
    endpoint_process,
    local_endpoint,
)

from .conftest import NO_WAIT

ONE_RETRY = dataclasses.replace(NO_WAIT, max_retries=1)
NO_RETRY = dataclasses.replace(NO_WAIT, max_retries=0)

WAIT = 10.0


def open_fds() -> int | None:
    path = f"/proc/{os.getpid()}/fd"
    return len(os.listdir(path)) if os.path.isdir(path) else None


def refused(url: str) -> bool:
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


# -- the in-loop endpoint ------------------------------------------------------------------------


async def test_local_endpoint_answers_and_records_what_it_received() -> None:
    async with local_endpoint() as endpoint:
        assert endpoint.url.startswith("http://127.0.0.1:")
        client = AsyncClient(endpoint.url, modal_key="wk-test", modal_secret="ws-test")
        async with client:
            assert await client.generate("hello there", temperature=0) == toy_generate(
                "hello there"
            )
        [request] = endpoint.requests
        assert (request.method, request.path, request.status) == ("POST", "/", 200)
        assert request.body == {"prompt": "hello there", "temperature": 0}
        assert request.prompt == "hello there"
        # Credentials are visible to the test, case-insensitively, and never in the repr.
        assert request.headers["modal-key"] == "wk-test"
        assert request.headers["Modal-Secret"] == "ws-test"
        assert "ws-test" not in repr(request) and "ws-test" not in repr(endpoint)
        assert request.scripted is None
        assert endpoint.stats.posts == 1 and endpoint.stats.statuses == {200: 1}


async def test_the_switches_are_the_server_config_fields(session: aiohttp.ClientSession) -> None:
    async with local_endpoint(modal_key="k", modal_secret="s") as endpoint:
        assert endpoint.config == ServerConfig(modal_key="k", modal_secret="s", retry_after="0")
        async with session.post(endpoint.url, json={"prompt": "x"}) as resp:
            assert (resp.status, await resp.text()) == (401, MISSING_CREDENTIALS)
    with pytest.raises(ConfigError, match="unknown endpoint switch colour"):
        local_endpoint(colour="red")
    with pytest.raises(ConfigError, match="pieces"):
        local_endpoint(pieces=0)
    with pytest.raises(ConfigError, match=r"script\[1\]"):
        local_endpoint(script=[429, 3.5])
    with pytest.raises(ConfigError, match="status"):
        local_endpoint(script=[302])
    with pytest.raises(ConfigError, match="sequence"):
        local_endpoint(script="hello")
    with pytest.raises(ConfigError, match="sequence"):
        local_endpoint(script=StreamReply(["a"]))


async def test_url_before_start_is_an_error() -> None:
    endpoint = local_endpoint()
    with pytest.raises(RuntimeError, match="not running"):
        _ = endpoint.url


async def test_a_429_storm_retries_at_once_and_is_recorded() -> None:
    async with local_endpoint(script=[429, 429, 429, "made it"]) as endpoint:
        async with AsyncClient(endpoint.url, max_retries=3) as client:
            assert await client.generate("storm") == "made it"
        posts = endpoint.posts
        assert [r.status for r in posts] == [429, 429, 429, 200]
        # One logical call: the same Idempotency-Key on every attempt.
        assert len({r.headers["Idempotency-Key"] for r in posts}) == 1
        assert all(r.prompt == "storm" for r in posts)
        assert posts[0].time <= posts[-1].time
        assert endpoint.script_left == 0


async def test_configure_changes_behaviour_mid_test() -> None:
    async with local_endpoint() as endpoint:
        async with AsyncClient(endpoint.url, retry=ONE_RETRY) as client:
            assert await client.generate("one")
            endpoint.configure(rate_limit_every=1)
            with pytest.raises(RateLimitError):
                await client.generate("two")
            endpoint.configure(rate_limit_every=0, script=["scripted"])
            assert await client.generate("three") == "scripted"
            endpoint.configure(error_burst=1, error_status=502)  # counts from here
            assert await client.generate("four") == toy_generate("four")
        assert [r.status for r in endpoint.posts] == [200, 429, 429, 200, 502, 200]
        assert endpoint.config.error_status == 502
        with pytest.raises(ConfigError):
            endpoint.configure(latency=-1)
        assert endpoint.config.latency == 0


async def test_configure_cold_start_makes_the_next_post_cold() -> None:
    async with local_endpoint() as endpoint:
        async with AsyncClient(endpoint.url) as client:
            await client.generate("warm")
            endpoint.configure(cold_start=0.01)
            await asyncio.gather(client.generate("a"), client.generate("b"))
        assert endpoint.stats.cold_starts == 1


# -- scripted replies --------------------------------------------------------------------------


async def test_each_script_entry_kind(session: aiohttp.ClientSession) -> None:
    script = [429, 503, 500, 422, 401, 404, 200, "hello", {"prompt": "custom", "x": 1}, "drop"]
    async with local_endpoint(script=[*script, "hang"], retry_after="2") as endpoint:
        replies = []
        for _ in range(9):
            async with session.post(endpoint.url, json={"prompt": "hi"}) as resp:
                replies.append((resp.status, resp.headers.get("Retry-After"), await resp.text()))
        assert replies[0] == (429, "2", "modal-http: too many requests")
        assert replies[1] == (503, "2", "modal-http: service unavailable")
        assert replies[2] == (500, None, INTERNAL_ERROR)
        assert replies[3][0] == 422 and '"loc":["body","prompt"]' in replies[3][2]
        assert replies[4] == (401, None, MISSING_CREDENTIALS)
        assert replies[5] == (404, None, "modal-http: not found")
        assert replies[6][0] == 200 and toy_generate("hi") in replies[6][2]
        assert replies[7][0] == 200 and '"prompt":"hello"' in replies[7][2]
        assert replies[8] == (200, None, '{"prompt":"custom","x":1}')
        with pytest.raises(aiohttp.ClientConnectionError):  # "drop": a reset, no reply
            async with session.post(endpoint.url, json={"prompt": "hi"}) as resp:
                await resp.read()
        with pytest.raises(asyncio.TimeoutError):  # "hang": no reply at all
            async with session.post(
                endpoint.url, json={"prompt": "hi"}, timeout=aiohttp.ClientTimeout(total=0.2)
            ) as resp:
                await resp.read()
        await endpoint.wait_for(lambda s: s.disconnects == 1)
        assert [r.scripted for r in endpoint.posts] == [*script, "hang"]
        assert [r.status for r in endpoint.posts][-2:] == [None, None]
        # Used up: the switches apply again.
        async with session.post(endpoint.url, json={"prompt": "hi"}) as resp:
            assert resp.status == 200
        assert endpoint.posts[-1].scripted is None


async def test_scripted_post_skips_the_other_switches(session: aiohttp.ClientSession) -> None:
    config = {"modal_key": "k", "modal_secret": "s", "rate_limit_every": 1, "cold_start": 5.0}
    async with local_endpoint(script=["through"], **config) as endpoint:
        async with session.post(endpoint.url, json={"prompt": "hi"}) as resp:
            assert resp.status == 200
        async with session.post(endpoint.url, json={"prompt": "hi"}) as resp:
            assert resp.status == 401
        assert endpoint.stats.cold_starts == 0


async def test_the_client_sees_scripted_transport_faults() -> None:
    timeout = Timeout(first_byte=0.1)
    async with (
        local_endpoint(script=["drop", "drop", "hang", "hang"]) as endpoint,
        AsyncClient(endpoint.url, retry=ONE_RETRY, timeout=timeout) as client,
    ):
        with pytest.raises(ConnectError):
            await client.generate("x")
        with pytest.raises(EndpointTimeoutError):
            await client.generate("y")
        assert [r.scripted for r in endpoint.posts] == ["drop", "drop", "hang", "hang"]


@pytest.mark.parametrize("fmt", ["sse", "ndjson", "text"])
async def test_scripted_streams_end_as_told(fmt: str) -> None:
    script = [
        StreamReply(["Hel", "lo"]),
        StreamReply(["Hel", "lo"], end="drop"),
        StreamReply(["Hel", "lo"], end="error"),
        "a scripted text",
        {"prompt": "one event"},
    ]
    async with (
        local_endpoint(script=script, stream_format=fmt, pieces=3) as endpoint,
        AsyncClient(endpoint.url, retry=NO_RETRY) as client,
    ):
        framed = fmt != "text"  # a text stream's pieces may coalesce on the wire
        pieces = [p async for p in client.stream("x")]
        assert pieces == ["Hel", "lo"] if framed else "".join(pieces) == "Hello"
        pieces = []
        with pytest.raises(StreamInterruptedError) as dropped:
            async for piece in client.stream("x"):
                pieces.append(piece)
        assert dropped.value.partial_text == "Hello" == "".join(pieces)
        error = StreamInterruptedError if fmt == "text" else ServerStreamError
        with pytest.raises(error):
            async for _ in client.stream("x"):
                pass
        assert "".join([p async for p in client.stream("x")]) == "a scripted text"
        joined = "".join([p async for p in client.stream("x")])
        assert joined == ('{"prompt":"one event"}' if fmt == "text" else "one event")


async def test_a_stream_reply_to_a_plain_post() -> None:
    script = [StreamReply(["a", "b"]), StreamReply(["a"], end="error"), StreamReply([], "drop")]
    async with (
        local_endpoint(script=script) as endpoint,
        AsyncClient(endpoint.url, retry=NO_RETRY) as client,
    ):
        assert await client.generate("x") == "ab"
        with pytest.raises(ServerError):
            await client.generate("x")
        with pytest.raises(ConnectError):
            await client.generate("x")


async def test_script_is_consumed_one_per_post_in_arrival_order() -> None:
    """Forty streams held open at once: entry i answers the i-th POST recorded, exactly once."""
    count = 40
    script = [StreamReply([f"reply {i}", " end"]) for i in range(count)]
    gate = asyncio.Event()  # every stream waits here after its first piece
    async with (
        local_endpoint(script=script, gate=gate) as endpoint,
        AsyncClient(endpoint.url, max_concurrency=count) as client,
    ):

        async def call(prompt: str) -> str:
            return "".join([piece async for piece in client.stream(prompt)])

        prompts = [f"prompt {i}" for i in range(count)]
        calls = asyncio.gather(*(call(p) for p in prompts))
        await endpoint.wait_for(lambda s: s.in_flight == count)  # all in flight at once
        gate.set()
        replies = await calls
    posts = endpoint.posts
    assert len(posts) == count and endpoint.script_left == 0
    assert [r.scripted for r in posts] == script
    answered = dict(zip(prompts, replies, strict=True))
    assert [answered[r.prompt] for r in posts] == [f"reply {i} end" for i in range(count)]  # type: ignore[index]


# -- the threaded endpoint ---------------------------------------------------------------------


def test_threaded_endpoint_serves_blocking_code() -> None:
    with LocalEndpoint(script=[503, "hello"]) as endpoint:
        with Client(endpoint.url, retry=NO_WAIT) as client:
            assert client.generate("hi") == "hello"
            assert "".join(client.stream("two words")) == toy_generate("two words")
        assert endpoint.stats.statuses[503] == 1
        endpoint.configure(rate_limit_every=1)
        with (
            Client(endpoint.url, retry=NO_RETRY) as client,
            pytest.raises(RateLimitError),
        ):
            client.generate("hi")
        endpoint.wait_for(lambda s: s.in_flight == 0)
        assert endpoint.posts[-1].status == 429


async def test_threaded_endpoint_in_an_async_test() -> None:
    with LocalEndpoint(stream_drop_after=1) as endpoint:
        async with AsyncClient(endpoint.url, retry=NO_WAIT) as client:
            with pytest.raises(StreamInterruptedError):
                async for _ in client.stream("x"):
                    pass
        await endpoint.wait_for_async(lambda s: s.posts == 1)
        assert endpoint.requests[0].body == {"prompt": "x", "stream": True}


def test_threaded_endpoint_starts_once_and_closes_twice() -> None:
    endpoint = LocalEndpoint()
    assert repr(endpoint).endswith("not running posts=0>")
    endpoint.configure(latency=0.0)  # before start: applied directly
    with endpoint, pytest.raises(RuntimeError, match="only once"):
        endpoint.start()
    endpoint.close()


# -- teardown leaves nothing ---------------------------------------------------------------------


async def test_local_endpoint_leaves_no_task_or_socket() -> None:
    fds = open_fds()
    client = None
    async with local_endpoint(script=["hang"]) as endpoint:
        url = endpoint.url
        client = AsyncClient(endpoint.url, retry=NO_RETRY)
        hung = asyncio.ensure_future(client.generate("hang"))
        await endpoint.wait_for(lambda s: s.in_flight == 1)
        # The endpoint closes with a request hanging and a client connected.
    assert refused(url)
    with pytest.raises(ConnectError):
        await hung
    await client.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    if fds is not None:
        assert open_fds() == fds


def test_threaded_endpoint_leaves_no_thread_or_socket() -> None:
    threads = set(threading.enumerate())
    fds = open_fds()
    with LocalEndpoint(script=["hang"]) as endpoint:
        url = endpoint.url
        assert len(set(threading.enumerate()) - threads) == 1
        with socket.create_connection((endpoint.host, endpoint.port)) as s:
            s.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{"prompt":""}')
            endpoint.wait_for(lambda st: st.in_flight == 1)
            endpoint.close()  # with a request hanging
            assert s.recv(100) == b""
    assert refused(url)
    assert set(threading.enumerate()) == threads
    if fds is not None:
        assert open_fds() == fds


def test_support_code_depends_one_way() -> None:
    """modal_llm imports neither tests nor benchmarks; benchmarks never import tests; a test
    module imports no other test module (shared helpers live in conftest.py, endpoints.py
    or modal_llm.testing). tests -> benchmarks (the soak engine) is the one allowed edge."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imports(path: Path) -> set[str]:
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                found.add("." * node.level + module)
        return found

    bad = []
    for folder, forbidden in (
        ("modal_llm", ("tests", "benchmarks")),
        ("benchmarks", ("tests",)),
    ):
        for path in (root / folder).rglob("*.py"):
            bad += [(path.name, m) for m in imports(path) if m.split(".")[0] in forbidden]
    for path in (root / "tests").rglob("*.py"):
        for module in imports(path):
            if module.startswith("."):
                local = module.lstrip(".")
            elif module.startswith("tests."):
                local = module.removeprefix("tests.")
            else:
                continue
            if local.split(".")[-1].startswith("test_"):
                bad.append((path.name, module))
    assert bad == []


async def test_fault_proxy_in_front_of_a_local_endpoint() -> None:
    """docs/testing.md's FaultProxy example."""
    async with local_endpoint() as endpoint:
        faults = FaultConfig(schedule=["reset", "none"])
        async with FaultProxy(endpoint.host, endpoint.port, faults) as proxy:
            async with AsyncClient(proxy.url, retry=NO_WAIT) as client:
                assert await client.generate("hi") == toy_generate("hi")
            assert proxy.counts["reset"] == 1
        assert endpoint.stats.posts == 1  # the reset exchange never reached it


def test_server_thread_serves_any_app() -> None:
    """docs/testing.md's ServerThread example."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"prompt": "always this"})

    app = web.Application()
    app.router.add_post("/", handler)
    with ServerThread(app) as server, Client(server.url) as client:
        assert client.generate("anything") == "always this"
        assert server.call(lambda: asyncio.get_running_loop() is server.loop)
    assert not server.running and server.loop is None
    with pytest.raises(RuntimeError, match="not running"):
        server.submit(asyncio.sleep(0))


# -- the endpoint in a process of its own ------------------------------------------------------


def test_endpoint_process_serves_until_the_block_ends() -> None:
    with endpoint_process("--modal-key", "k", "--modal-secret", "s") as url:
        assert url.startswith("http://127.0.0.1:")
        with Client(url, modal_key="k", modal_secret="s", retry=NO_RETRY) as client:
            assert client.generate("apart") == toy_generate("apart")
    assert refused(url)


def test_endpoint_process_that_cannot_start_says_so(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="did not start"), endpoint_process("--latency", "-1"):
        pass
    assert "latency" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("switches", "needle"),
    [
        ({"latency": "x"}, "latency must be float, not str"),
        ({"latency": math.nan}, "latency must be a finite number"),
        ({"piece_delay": math.inf}, "piece_delay must be a finite number"),
        ({"seed": "x"}, "seed must be int, not str"),
        ({"pieces": 2.5}, "pieces must be int, not float"),
        ({"echo_prompt": 1}, "echo_prompt must be bool, not int"),
        ({"rate_limit_every": True}, "rate_limit_every must be int, not bool"),
        ({"retry_after": 5}, "retry_after must be str or None, not int"),
        ({"script": ["\ud800"]}, "script[0] cannot be sent as UTF-8 JSON"),
        ({"script": [200, {"prompt": {1, 2}}]}, "script[1] cannot be sent as UTF-8 JSON"),
    ],
)
async def test_a_switch_or_script_entry_of_the_wrong_kind_is_a_config_error(
    switches: dict[str, Any], needle: str
) -> None:
    """Review R25: these were a bare TypeError, accepted silently, or accepted and then
    crashed the handler on every request (a 500 far from the mistake)."""
    async with local_endpoint() as endpoint:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            endpoint.configure(**switches)
        async with AsyncClient(endpoint.url) as client:  # nothing changed: still answers
            assert await client.generate("hi")


def test_a_stream_reply_of_one_string_is_refused_not_streamed_by_character() -> None:
    with pytest.raises(ConfigError, match=re.escape("StreamReply(['abc'])")):
        StreamReply("abc")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot be sent"):
        StreamReply(["ok", "\udfff"])
    assert StreamReply(["abc"]).pieces == ("abc",)
