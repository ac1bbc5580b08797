"""The blocking ``Client``: delegation, streams, threads, Ctrl-C, running loops and closing.

The endpoint runs on its own thread and loop (``ThreadedEndpoint``), so blocking calls can
be made from the test's thread, from inside a running loop and from many threads at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import inspect
import json
import subprocess
import sys
import textwrap
import threading
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from modal_llm import (
    AsyncClient,
    Client,
    ClientClosedError,
    Completion,
    ConfigError,
    ModalLLMError,
    PoolStats,
    StatusError,
    UseClientDefault,
    _portal,
)
from modal_llm._config import TimeoutTypes
from modal_llm.server import toy_generate
from modal_llm.testing import LocalEndpoint

from .endpoints import STREAM_PIECES, WAIT, ThreadedEndpoint


@pytest.fixture
def endpoint() -> Iterator[ThreadedEndpoint]:
    server = ThreadedEndpoint()
    yield server
    server.close()


@pytest.fixture
def client(endpoint: ThreadedEndpoint) -> Iterator[Client]:
    with Client(endpoint.url, max_retries=0) as client:
        yield client


def test_calls_from_plain_code(client: Client, endpoint: ThreadedEndpoint) -> None:
    assert client.generate("hi", max_tokens=3) == 'hi :: {"max_tokens": 3}'
    assert client.generate("hi there", stop=" there") == "hi"
    reply = client.complete("hi")
    assert isinstance(reply, Completion)
    assert reply.data["usage"] == {"n": 1}
    prompts = [f"p{i}" for i in range(5)]
    assert client.generate_many(iter(prompts)) == [f"{p} :: {{}}" for p in prompts]
    assert endpoint.bodies[0] == {"prompt": "hi", "max_tokens": 3}


def test_errors_cross_the_thread_unchanged(client: Client) -> None:
    with pytest.raises(StatusError) as info:
        client.generate("fail: please")
    assert info.value.status_code == 422
    results = client.generate_many(["a", "fail: b", "c"], return_exceptions=True)
    assert results[0] == "a :: {}"
    assert isinstance(results[1], StatusError)
    assert results[2] == "c :: {}"
    with pytest.raises(ConfigError):
        client.generate(123)  # type: ignore[arg-type]


def test_stream_yields_pieces(client: Client, endpoint: ThreadedEndpoint) -> None:
    assert list(client.stream("tell me")) == list(STREAM_PIECES)
    assert endpoint.bodies[-1] == {"prompt": "tell me", "stream": True}
    assert "".join(client.stream("tell me", stop="two")) == "one "


def test_a_temporary_client_lives_as_long_as_its_generator(endpoint: ThreadedEndpoint) -> None:
    # Nothing but the generator refers to the Client: it must keep it open until it ends.
    before = {t for t in threading.enumerate() if t.name == "modal-llm-loop"}
    assert list(Client(endpoint.url).stream("tell me")) == list(STREAM_PIECES)
    results = Client(endpoint.url).map(["a", "b"], ordered=True)
    assert [r.text for r in results] == ["a :: {}", "b :: {}"]
    del results
    gc.collect()  # and then it is closed: no loop thread is left behind
    assert {t for t in threading.enumerate() if t.name == "modal-llm-loop"} <= before


def test_leaving_a_stream_early_closes_the_response(
    client: Client, endpoint: ThreadedEndpoint
) -> None:
    for piece in client.stream("hold: a long story"):
        assert piece == "one "
        break
    assert endpoint.disconnected.wait(WAIT)
    assert client.generate("still fine") == "still fine :: {}"


async def test_works_inside_a_running_loop(endpoint: ThreadedEndpoint) -> None:
    # asyncio.run() would fail here (a Jupyter cell, or sync code called from async code).
    asyncio.get_running_loop()
    with Client(endpoint.url) as client:
        assert client.generate("in a loop") == "in a loop :: {}"
        assert list(client.stream("in a loop")) == list(STREAM_PIECES)


def test_sixteen_threads_share_one_client_and_pool(endpoint: ThreadedEndpoint) -> None:
    endpoint.gate_at = 16
    with (
        Client(endpoint.url, max_concurrency=16) as client,
        concurrent.futures.ThreadPoolExecutor(16) as pool,
    ):
        prompts = [f"gate: {i}" for i in range(32)]
        results = list(pool.map(client.generate, prompts))
    assert results == [f"{p} :: {{}}" for p in prompts]
    # The gate opens only once 16 requests are in flight together, and never more are.
    assert endpoint.max_in_flight == 16
    assert len(endpoint.peers) <= 16  # 32 calls reused the pool's connections


def test_pool_is_the_async_clients(endpoint: ThreadedEndpoint) -> None:
    with Client(endpoint.url, max_concurrency=4) as client:
        assert client.pool == PoolStats(4, 0, 0, 0)
        client.generate("one")
        assert client.pool == PoolStats(4, 0, 0, 1)


def test_threads_each_get_their_own_outcome_when_calls_settle_together(
    endpoint: ThreadedEndpoint,
) -> None:
    # 48 calls from 24 threads, gated so they settle in batches: results and errors are
    # handed back to their own callers, never swapped within a batch.
    endpoint.gate_at = 24
    prompts = [f"gate: {i}" if i % 3 else f"fail: {i}" for i in range(48)]

    def call(prompt: str) -> str:
        try:
            return client.generate(prompt)
        except StatusError as exc:
            return f"{prompt} -> {exc.status_code}"

    with (
        Client(endpoint.url, max_concurrency=24) as client,
        concurrent.futures.ThreadPoolExecutor(24) as pool,
    ):
        results = list(pool.map(call, prompts))
    assert results == [f"{p} :: {{}}" if i % 3 else f"{p} -> 422" for i, p in enumerate(prompts)]


def test_generate_many_runs_under_the_limit(endpoint: ThreadedEndpoint) -> None:
    endpoint.gate_at = 4
    with Client(endpoint.url, max_concurrency=4) as client:
        results = client.generate_many([f"gate: {i}" for i in range(12)])
    assert results == [f"gate: {i} :: {{}}" for i in range(12)]
    assert endpoint.max_in_flight == 4


def test_ctrl_c_cancels_the_call_and_keeps_the_client(
    client: Client, endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_wait = _portal._wait_for_result
    interrupted: list[bool] = []

    def wait_then_ctrl_c(future: concurrent.futures.Future[Any]) -> Any:
        if not interrupted:  # like a SIGINT arriving while the server holds the request
            interrupted.append(True)
            assert endpoint.received.wait(WAIT)
            raise KeyboardInterrupt
        return real_wait(future)

    monkeypatch.setattr(_portal, "_wait_for_result", wait_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        client.generate("hold: forever")
    assert endpoint.disconnected.wait(WAIT)  # the request was cancelled, not left running
    assert client.generate("next") == "next :: {}"
    assert not client.closed


def test_ctrl_c_during_a_stream_closes_its_response(
    client: Client, endpoint: ThreadedEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_wait = _portal._wait_for_result
    waits: list[int] = []

    def ctrl_c_on_second_piece(future: concurrent.futures.Future[Any]) -> Any:
        waits.append(1)
        if len(waits) == 3:  # 1: open the stream, 2: first piece, 3: the held second piece
            assert endpoint.received.wait(WAIT)
            raise KeyboardInterrupt
        return real_wait(future)

    monkeypatch.setattr(_portal, "_wait_for_result", ctrl_c_on_second_piece)
    pieces = client.stream("hold: after one piece")
    assert next(pieces) == "one "
    with pytest.raises(KeyboardInterrupt):
        next(pieces)
    assert endpoint.disconnected.wait(WAIT)
    assert list(client.stream("again")) == list(STREAM_PIECES)


def test_close_fails_calls_in_flight(client: Client, endpoint: ThreadedEndpoint) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.generate, "hold: until closed")
        assert endpoint.received.wait(WAIT)
        client.close()
        with pytest.raises(ClientClosedError):
            pending.result(WAIT)


def test_closed_client_cannot_be_reused(endpoint: ThreadedEndpoint) -> None:
    client = Client(endpoint.url)
    thread = client._portal._thread  # type: ignore[union-attr]
    assert client.generate("once") == "once :: {}"
    client.close()
    client.close()  # idempotent
    assert not thread.is_alive()
    assert client.closed
    assert repr(client).endswith(" closed>")
    with pytest.raises(ClientClosedError, match=r"Cannot use a closed client; create a new one\."):
        client.generate("twice")
    with pytest.raises(ClientClosedError):
        client.stream("twice")
    with pytest.raises(ClientClosedError), client:
        pass


def test_garbage_collected_client_shuts_down(endpoint: ThreadedEndpoint) -> None:
    client = Client(endpoint.url)
    client.generate("warm the pool")
    portal = client._portal
    assert portal is not None
    del client
    gc.collect()
    assert portal.closed
    assert not portal._thread.is_alive()
    assert portal.loop.is_closed()


def test_repr_and_errors_hide_credentials(endpoint: ThreadedEndpoint) -> None:
    with Client(endpoint.url, modal_key="wk-SECRET1", modal_secret="ws-SECRET2") as client:
        assert client.generate("hi") == "hi :: {}"
        shown = repr(client) + repr(client.options)
        assert "SECRET" not in shown
        assert endpoint.url.rstrip("/") in repr(client)
    assert endpoint.headers[0]["Modal-Key"] == "wk-SECRET1"


def test_bad_options_fail_before_a_thread_starts() -> None:
    def loop_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "modal-llm-loop"}

    before = loop_threads()
    with pytest.raises(ConfigError):
        Client("ftp://example.com")
    with pytest.raises(ConfigError):
        Client("http://127.0.0.1:1/", max_concurrency=0)
    assert loop_threads() <= before


EXIT_SCRIPT = textwrap.dedent(
    """
    import gc, sys
    from modal_llm import Client

    url = sys.argv[1]
    dropped = Client(url)
    dropped.generate("dropped")
    del dropped
    gc.collect()
    left_open = Client(url, max_concurrency=4)
    print(left_open.generate("left open"))
    pieces = left_open.stream("hold: never finished")
    print(next(pieces))
    """
)


def test_interpreter_exit_with_an_open_client_is_quiet(endpoint: ThreadedEndpoint) -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", EXIT_SCRIPT, endpoint.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": ""},
    )
    assert done.stderr == ""
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["left open :: {}", "one "]
    assert endpoint.disconnected.wait(WAIT)  # exit closed the abandoned stream's response


def test_is_a_modal_llm_error_everywhere(client: Client) -> None:
    client.close()
    with pytest.raises(ModalLLMError):
        client.generate_many(["x"])


def test_blocking_map_passes_every_option_through(
    client: Client, endpoint: ThreadedEndpoint
) -> None:
    progress: list[tuple[int, int | None, int]] = []
    results = list(
        client.map(
            ["a", "fail:b", {"prompt": "c", "id": "c1", "top_k": 2}],
            ordered=True,
            concurrency=2,
            window=2,
            on_progress=lambda *args: progress.append(args),
            stop=[" ::"],
            headers={"X-Batch": "7"},
            timeout=30.0,
            max_tokens=5,
        )
    )
    assert [r.id for r in results] == [0, 1, "c1"]
    assert [r.text for r in results] == ["a", None, "c"]  # cut at the stop sequence
    assert isinstance(results[1].error, StatusError) and results[1].error.status_code == 422
    assert progress[-1] == (3, 3, 1)
    assert sorted(json.dumps(b, sort_keys=True) for b in endpoint.bodies) == sorted(
        json.dumps(b, sort_keys=True)
        for b in (
            {"prompt": "a", "max_tokens": 5},
            {"prompt": "fail:b", "max_tokens": 5},
            {"prompt": "c", "max_tokens": 5, "top_k": 2},
        )
    )
    assert all(h["X-Batch"] == "7" for h in endpoint.headers)


def test_blocking_map_refuses_more_concurrency_than_the_client(endpoint: ThreadedEndpoint) -> None:
    with Client(endpoint.url, max_concurrency=4) as client:
        with pytest.raises(ConfigError, match=r"concurrency=8 exceeds .*max_concurrency=4"):
            client.map(["a"], concurrency=8)
        assert endpoint.bodies == []


_ASYNC_ONLY: Final = {"aclose"}
_SYNC_ONLY: Final = {"close", "closed"}


def _public_methods(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_client_and_async_client_methods_take_the_same_parameters() -> None:
    # Both faces are written out (as httpx and openai do): this keeps them from drifting.
    assert _public_methods(AsyncClient) - _ASYNC_ONLY == _public_methods(Client) - _SYNC_ONLY
    compared = 0
    for name in [*sorted(_public_methods(Client) - _SYNC_ONLY), "__init__"]:
        sync_attr, async_attr = inspect.getattr_static(Client, name), getattr(AsyncClient, name)
        if isinstance(sync_attr, property):
            continue
        sync_params = inspect.signature(getattr(Client, name)).parameters.values()
        async_params = inspect.signature(async_attr).parameters.values()
        assert [(p.name, p.kind, p.default) for p in sync_params] == [
            (p.name, p.kind, p.default) for p in async_params
        ], name
        compared += 1
    assert compared >= 8  # __init__, from_options, generate, complete, resume, ..., map


def test_client_map_is_typed_like_async_client_map() -> None:
    hints = typing.get_type_hints(Client.map)
    async_hints = typing.get_type_hints(AsyncClient.map)
    assert {k: v for k, v in hints.items() if k not in ("items", "return")} == {
        k: v for k, v in async_hints.items() if k not in ("items", "return")
    }
    assert hints["timeout"] == TimeoutTypes | UseClientDefault


def test_blocking_map_yields_results_in_order() -> None:
    with LocalEndpoint() as endpoint, Client(endpoint.url) as client:
        results = list(client.map(["a", "b", "c"], ordered=True))
    assert [r.text for r in results] == [toy_generate(p) for p in ("a", "b", "c")]
