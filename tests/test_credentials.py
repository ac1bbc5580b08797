"""Credential safety: Modal-Key, Modal-Secret and Authorization never escape.

Not in logs at any level (aiohttp's loggers included), not in the repr or str of clients,
options, LangChain objects or errors (from any status, any transport failure, and even when a
server echoes the request back), not in URLs shown in errors, and never in a request to
another origin, for any followed redirect status and on any hop. Header values with CR or
LF are refused before anything is sent, and credentials over plain http:// to a host that
is not loopback draw a warning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import traceback
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConfigError,
    ContractError,
    ModalLLMError,
    RedirectError,
    ResultPendingError,
    RetryPolicy,
    ServerError,
    StatusError,
    StreamError,
    Timeout,
)
from modal_llm.testing import FaultConfig, FaultProxy

from .conftest import NO_WAIT, MakeEndpoint

pytestmark = pytest.mark.timeout(60)

KEY = "wk-CRED-KEY-7f3a9e"
SECRET = "ws-CRED-SECRET-9c1e44"
TOKEN = "tok-CRED-BEARER-55d2"
BEARER = f"Bearer {TOKEN}"
QUERY_TOKEN = "qs-CRED-QUERY-81b0"
HEADER_SECRETS = (KEY, SECRET, TOKEN)
SECRETS = (*HEADER_SECRETS, QUERY_TOKEN)
AUTH: dict[str, Any] = {
    "modal_key": KEY,
    "modal_secret": SECRET,
    "headers": {"Authorization": BEARER},
}
CREDENTIAL_NAMES = frozenset(
    {"modal-key", "modal-secret", "authorization", "x-api-key", "x-auth-token", "x-session-id"}
)
API_KEY, AUTH_TOKEN, SESSION = "ak-CRED-APIKEY-3e7d", "at-CRED-AUTHTOK-c0a1", "ss-CRED-SESS-77b9"
SSE = b'data: {"prompt": "streamed"}\n\ndata: [DONE]\n\n'


def assert_hidden(*shown: object, secrets: tuple[str, ...] = SECRETS) -> None:
    """No secret appears in any of ``shown`` (strings as they are, anything else as repr)."""
    for item in shown:
        text = item if isinstance(item, str) else repr(item)
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked in: {text[:500]}"


def forms(error: BaseException) -> list[str]:
    """Every way an error is usually shown: str, repr, its attributes, a full traceback."""
    return [
        str(error),
        repr(error),
        repr(vars(error)),
        "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    ]


def carries_credentials(headers: dict[str, str]) -> bool:
    return bool(CREDENTIAL_NAMES & {name.lower() for name in headers})


@dataclass
class Seen:
    """Requests one server received: method, path and headers."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def record(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))


def echo(request: web.Request, status: int) -> web.Response:
    """A reply that shows the request headers: a debugging proxy, an echo endpoint."""
    body = json.dumps(dict(request.headers)).encode()
    return web.Response(status=status, body=body, content_type="application/json")


async def origin_handler(request: web.Request) -> web.StreamResponse:
    """The endpoint: the prompt (or, for GETs, the path) picks the behaviour."""
    if request.method == "GET":
        if request.path == "/result":
            return web.json_response({"prompt": "polled"})
        return web.json_response({"prompt": "elsewhere"})
    body = await request.json()
    prompt: str = body["prompt"]
    attempt = int(request.headers.get("X-Modal-LLM-Attempt", "1"))
    if prompt.startswith("status:"):
        return echo(request, int(prompt.split(":")[1]))
    if prompt == "flaky" and attempt == 1:
        return web.Response(status=503, text="warming up")
    if prompt == "busy" and attempt == 1:
        return web.Response(status=429, headers={"Retry-After": "0"}, text="busy")
    if prompt == "hop":
        location = f"/result?__modal_function_call_id=fc-1&token={QUERY_TOKEN}"
        return web.Response(status=303, headers={"Location": location})
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(SSE)
        return resp
    return web.json_response({"prompt": "ok"})


# -- logs -----------------------------------------------------------------------------------------

LOGGERS = ("", "modal_llm", "aiohttp", "aiohttp.client", "aiohttp.server", "aiohttp.access")


async def test_logs_at_every_level_never_show_credentials(
    make_endpoint: MakeEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    app_log = logging.getLogger("tests.app")
    url = await make_endpoint(origin_handler, path=f"/gen?token={QUERY_TOKEN}")
    retry = RetryPolicy(max_retries=2, wait_initial=0, wait_max=0, jitter=0)
    errors: list[ModalLLMError] = []
    async with AsyncClient(url, retry=retry, timeout=Timeout(0.5), **AUTH) as client:
        prompts = ["ok", "flaky", "busy", "hop", "status:401", "status:500", "status:200"]
        calls: list[Callable[[], Awaitable[object]]] = [
            *(functools.partial(client.generate, prompt) for prompt in prompts),
            functools.partial(collect, client, "ok"),
            functools.partial(collect, client, "status:403"),
        ]
        for call in calls:
            try:
                await call()
            except ModalLLMError as exc:
                errors.append(exc)
                app_log.exception("call failed: %s", exc)  # what an application does
    refused = f"http://127.0.0.1:{await closed_port()}/gen"
    async with AsyncClient(refused, retry=retry, **AUTH) as client:
        try:
            await client.generate("ok")
        except ModalLLMError as exc:
            errors.append(exc)
            app_log.exception("call failed: %s", exc)
    assert len(errors) == 5
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = [formatter.format(record) for record in caplog.records]
    # The test server's access log shows the request line, query included: that is the
    # server's business. Credential headers must appear nowhere, server logs included.
    client_lines = [line for line in lines if not line.startswith("aiohttp.access")]
    assert any("retrying after attempt" in line for line in lines)  # modal_llm INFO
    assert any("following 303" in line for line in lines)  # modal_llm DEBUG
    assert any(line.startswith("tests.app ERROR") and "Traceback" in line for line in lines)
    assert_hidden(*lines, caplog.text, secrets=HEADER_SECRETS)
    assert_hidden(*client_lines)


async def collect(client: AsyncClient, prompt: str) -> str:
    return "".join([piece async for piece in client.stream(prompt)])


async def closed_port() -> int:
    """A loopback port with nothing listening: bound, then released."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


# -- reprs ----------------------------------------------------------------------------------------


async def test_reprs_of_clients_and_options_hide_credentials(make_endpoint: MakeEndpoint) -> None:
    url = await make_endpoint(origin_handler, path=f"/gen?token={QUERY_TOKEN}")
    client = AsyncClient(url, **AUTH)
    assert_hidden(repr(client), str(client), repr(client.options), str(client.options))
    async with client:
        assert await client.generate("ok") == "ok"
        assert_hidden(repr(client), str(client), repr(client.options))
    assert_hidden(repr(client))
    blocking = await asyncio.to_thread(Client, url, **AUTH)
    try:
        assert_hidden(repr(blocking), str(blocking), repr(blocking.options))
    finally:
        await asyncio.to_thread(blocking.close)
    assert_hidden(repr(blocking))


def test_langchain_llm_hides_credentials() -> None:
    pytest.importorskip("langchain_core")
    from pydantic import SecretStr

    from modal_llm.langchain import Modal

    llm = Modal(
        endpoint_url="https://x--llm.modal.run/",
        modal_key=SecretStr(KEY),
        modal_secret=SecretStr(SECRET),
    )
    assert_hidden(repr(llm), str(llm), repr(llm._identifying_params))


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["generate", "stream"])
async def test_errors_from_every_status_hide_credentials_even_when_echoed(
    make_endpoint: MakeEndpoint, op: str
) -> None:
    """Every 2xx-5xx status, with a body that repeats the request headers back."""
    url = await make_endpoint(origin_handler, path=f"/gen?token={QUERY_TOKEN}")
    errors: list[ModalLLMError] = []
    async with AsyncClient(
        url, retry=dataclasses.replace(NO_WAIT, max_retries=1), **AUTH
    ) as client:
        for status in range(200, 600):
            with pytest.raises(ModalLLMError) as info:
                if op == "generate":
                    await client.generate(f"status:{status}")
                else:
                    await collect(client, f"status:{status}")
            errors.append(info.value)
    assert {StatusError, ServerError, AuthenticationError, ContractError} <= set(map(type, errors))
    masked = 0
    for error in errors:
        assert_hidden(*forms(error))
        if isinstance(error, (StatusError, ContractError)) and error.body_excerpt:
            assert "***" in error.body_excerpt  # the echo was there, and masked
            masked += 1
    assert masked > 300


async def test_transport_failures_hide_credentials(make_endpoint: MakeEndpoint) -> None:
    async def slow_stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(50):
            await resp.write(f'data: {{"prompt": "piece {i} "}}\n\n'.encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    upstream = await make_endpoint(slow_stream)
    port = int(upstream.rsplit(":", 1)[1].split("/")[0])
    errors: list[ModalLLMError] = []
    schedule = ["refuse", "reset", "stall_before", "stall_mid", "cut"]
    async with FaultProxy("127.0.0.1", port, FaultConfig(schedule=list(schedule))) as proxy:
        url = proxy.url + f"gen?token={QUERY_TOKEN}"
        async with AsyncClient(url, max_retries=0, timeout=Timeout(0.3), **AUTH) as client:
            for _ in schedule:
                try:
                    await collect(client, "ok")
                except ModalLLMError as exc:
                    errors.append(exc)
        proxy.release()
    refused = f"http://127.0.0.1:{await closed_port()}/gen?token={QUERY_TOKEN}"
    async with AsyncClient(refused, max_retries=0, **AUTH) as client:
        with pytest.raises(ModalLLMError) as info:
            await client.generate("ok")
        errors.append(info.value)
    assert len(errors) == len(schedule) + 1
    assert any(isinstance(e, StreamError) and e.partial_text for e in errors)
    for error in errors:
        assert error.url is not None and f"token={QUERY_TOKEN}" not in error.url
        assert_hidden(*forms(error))


async def test_result_url_in_errors_is_redacted_but_resumable(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        location = f"/result?__modal_function_call_id=fc-9&token={QUERY_TOKEN}"
        if request.method == "GET" and request.query.get("final") == "1":
            return web.json_response({"prompt": "done"})
        if request.method == "GET":
            location += "&final=1"
        return web.Response(status=303, headers={"Location": location})

    url = await make_endpoint(handler)
    async with AsyncClient(url, max_redirects=1, **AUTH) as client:
        with pytest.raises(ResultPendingError) as info:
            await client.generate("long")
        assert_hidden(*forms(info.value)[:2])
        assert "fc-9" in str(info.value)  # the call id is kept: it is what resume() needs
        assert QUERY_TOKEN in info.value.result_url  # the attribute keeps the real URL
        completion = await client.resume(info.value.result_url)
    assert completion.text == "done"


# -- redirects ------------------------------------------------------------------------------------


@dataclass
class TwoOrigins:
    """An endpoint (A) and another origin (B): same host, another port.

    ``state`` steers A: the redirect ``status``, the ``route`` and B's ``target`` path.
    """

    a: str = ""
    b: str = ""
    seen_a: Seen = field(default_factory=Seen)
    seen_b: Seen = field(default_factory=Seen)
    state: dict[str, str] = field(default_factory=dict)


@pytest.fixture
async def origins(make_endpoint: MakeEndpoint) -> TwoOrigins:
    origins = TwoOrigins()
    seen_a, seen_b, state = origins.seen_a, origins.seen_b, origins.state

    async def other(request: web.Request) -> web.StreamResponse:
        seen_b.record(request)
        if request.path == "/back":  # B sends the client home to A again
            return web.Response(status=int(state["status"]), headers={"Location": state["home"]})
        if request.path == "/stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(SSE)
            return resp
        return web.json_response({"prompt": "from B"})

    b = origins.b = await make_endpoint(other)

    async def endpoint(request: web.Request) -> web.StreamResponse:
        seen_a.record(request)
        status = int(request.headers.get("X-Status", state.get("status", "303")))
        route = state["route"]
        if request.method == "POST":
            state["status"] = str(status)
            if route == "direct":
                return redirect(status, b + state["target"])
            return redirect(status, "/hop")  # same origin first
        if request.path == "/hop":
            if route == "same-then-cross":
                return redirect(status, b + state["target"])
            return redirect(status, b + "back")  # cross, then back home
        return web.json_response({"prompt": "back home"})

    origins.a = await make_endpoint(endpoint)
    state["home"] = origins.a + "home"
    return origins


def redirect(status: int, location: str) -> web.Response:
    return web.Response(status=status, headers={"Location": location})


@pytest.mark.parametrize("status", [301, 302, 303])
@pytest.mark.parametrize("route", ["direct", "same-then-cross", "cross-then-back"])
@pytest.mark.parametrize("op", ["generate", "stream"])
async def test_redirects_never_carry_credentials_to_another_origin(
    origins: TwoOrigins, status: int, route: str, op: str
) -> None:
    origins.state.update(route=route, status=str(status), target="stream" if op == "stream" else "")
    # Credentials from every source, in any letter case: options, headers=, per call; and
    # every header the client masks as a credential (review R3), not only Modal's own.
    client_headers = {"authorization": BEARER, "X-Api-Key": API_KEY}
    async with AsyncClient(
        origins.a, modal_key=KEY, modal_secret=SECRET, headers=client_headers
    ) as client:
        call_headers = {
            "X-Status": str(status),
            "MODAL-KEY": KEY,
            "x-auth-token": AUTH_TOKEN,
            "X-Session-Id": SESSION,
        }
        if op == "generate":
            text = await client.generate("hi", headers=call_headers)
        else:
            text = "".join([piece async for piece in client.stream("hi", headers=call_headers)])
    assert text == (
        "back home" if route == "cross-then-back" else "streamed" if op == "stream" else "from B"
    )
    assert origins.seen_b.requests, "the redirect never reached the other origin"
    for method, path, headers in origins.seen_b.requests:
        assert method == "GET"
        assert not carries_credentials(headers), f"{path} got {sorted(headers)}"
        assert_hidden(json.dumps(headers), secrets=(*SECRETS, API_KEY, AUTH_TOKEN, SESSION))
        assert "Idempotency-Key" in headers  # not a credential: the call's own key
    first = origins.seen_a.requests[0]
    assert first[0] == "POST" and carries_credentials(first[2])
    if route != "direct":  # the same-origin hop keeps them: Modal asks for them there too
        hop = origins.seen_a.requests[1]
        assert hop[1] == "/hop" and carries_credentials(hop[2])
    if route == "cross-then-back":  # once shown the door, never handed back
        home = origins.seen_a.requests[-1]
        assert home[1] == "/home" and not carries_credentials(home[2])


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("op", ["generate", "stream"])
async def test_307_and_308_are_refused_and_reach_no_one(
    origins: TwoOrigins, status: int, op: str
) -> None:
    origins.state.update(route="direct", status=str(status), target="")
    async with AsyncClient(origins.a, **AUTH) as client:
        with pytest.raises(RedirectError, match="re-send the prompt") as info:
            if op == "generate":
                await client.generate("hi")
            else:
                await collect(client, "hi")
    assert origins.seen_b.requests == []
    assert len(origins.seen_a.requests) == 1
    assert_hidden(*forms(info.value))


# -- header injection -----------------------------------------------------------------------------

BAD_VALUES = ["a\rb", "a\nb", "a\r\nX-Injected: 1", "\r\n", "a\x00b", "a\x01b", "a\x7fb"]


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize(
    "where", ["modal_key", "modal_secret", "header value", "header name", "call header", "env"]
)
async def test_cr_or_lf_in_a_header_is_refused_before_sending(
    make_endpoint: MakeEndpoint, monkeypatch: pytest.MonkeyPatch, bad: str, where: str
) -> None:
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.json_response({"prompt": "ok"})

    url = await make_endpoint(handler)
    options: dict[str, Any] = {"modal_key": KEY, "modal_secret": SECRET}
    if where == "modal_key":
        options["modal_key"] = KEY + bad
    elif where == "modal_secret":
        options["modal_secret"] = SECRET + bad
    elif where == "header value":
        options["headers"] = {"Authorization": BEARER + bad}
    elif where == "header name":
        options["headers"] = {f"X-Name{bad}": "1"}
    elif where == "env":
        if "\x00" in bad:
            pytest.skip("the environment cannot hold NUL")
        del options["modal_key"], options["modal_secret"]
        monkeypatch.setenv("MODAL_LLM_KEY", KEY + bad)
        monkeypatch.setenv("MODAL_LLM_SECRET", SECRET)
    if where != "call header":
        with pytest.raises(ConfigError) as info:
            AsyncClient(url, **options)
        with pytest.raises(ConfigError):
            Client(url, **options)
    else:
        async with AsyncClient(url, **options) as client:
            with pytest.raises(ConfigError) as info:
                await client.generate("hi", headers={"Authorization": BEARER + bad})
            with pytest.raises(ConfigError):
                client.stream("hi", headers={"X-Trace": bad})
            assert await client.generate("hi") == "ok"  # the client is still fine
    assert "CR, LF" in str(info.value) or "invalid header name" in str(info.value)
    assert_hidden(*forms(info.value))
    assert len(seen.requests) == (1 if where == "call header" else 0)


# -- plain http -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://me--llm.modal.run/",
        "http://10.0.0.5:8000/",
        "http://[2001:db8::1]:8000/",
        "http://127.example.com/",  # a name, not an address: it can resolve anywhere
        "http://localhost.example.com/",
        "http://0.0.0.0:8000/",
    ],
)
def test_credentials_over_plain_http_to_a_remote_host_warn(url: str) -> None:
    with pytest.warns(UserWarning, match="plain http://") as record:
        AsyncClient(url, modal_key=KEY, modal_secret=SECRET)
    assert record[0].filename == __file__  # points at the caller, not into modal_llm
    assert_hidden(*(str(w.message) for w in record))


def test_credentials_from_the_environment_warn_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_LLM_KEY", KEY)
    monkeypatch.setenv("MODAL_LLM_SECRET", SECRET)
    with pytest.warns(UserWarning, match="plain http://"):
        AsyncClient("http://me--llm.modal.run/")


@pytest.mark.parametrize(
    ("url", "auth"),
    [
        ("https://me--llm.modal.run/", True),
        ("http://127.0.0.1:8000/", True),
        ("http://127.1.2.3/", True),
        ("http://localhost:8000/", True),
        ("http://api.localhost/", True),
        ("http://[::1]:8000/", True),
        ("http://me--llm.modal.run/", False),  # nothing secret to expose
    ],
)
def test_no_warning_for_https_loopback_or_no_credentials(url: str, auth: bool) -> None:
    options: dict[str, Any] = {"modal_key": KEY, "modal_secret": SECRET} if auth else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AsyncClient(url, **options)


@pytest.mark.parametrize("name", ["X A", "X\tA", "X-É", "(X)", "X:A", "", "X-A\x00"])
async def test_header_names_must_be_tokens(make_endpoint: MakeEndpoint, name: str) -> None:
    """A name aiohttp would refuse at send time (bare ValueError) is a ConfigError up front."""
    url = await make_endpoint(origin_handler)
    with pytest.raises(ConfigError, match="invalid header name"):
        AsyncClient(url, headers={name: "1"})
    async with AsyncClient(url) as client:
        with pytest.raises(ConfigError, match="invalid header name"):
            await client.generate("hi", headers={name: "1"})
