"""The client's life: opening per loop, closing, and what a leak looks like (issue 12.10)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap

import pytest
from aiohttp import web

from modal_llm import (
    AsyncClient,
    ClientClosedError,
)

from ..conftest import MakeEndpoint
from .helpers import KEY, SECRET, reply


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


async def test_no_unclosed_session_after_many_calls(make_endpoint: MakeEndpoint) -> None:
    async def handler(request: web.Request) -> web.Response:
        return reply("x")

    url = await make_endpoint(handler)
    for _ in range(3):
        async with AsyncClient(url) as c:
            await c.generate_many(["a"] * 10)
    gc.collect()  # with filterwarnings=error, a leaked session would fail here


# -- an unclosed client, as a user sees it (a subprocess: no pytest warning filters) --

LEAK = textwrap.dedent(
    """
    import asyncio, gc
    from aiohttp import web
    from modal_llm import AsyncClient

    async def handler(request):
        return web.json_response({"prompt": "hi"})

    async def main():
        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        client = AsyncClient(f"http://127.0.0.1:{port}/", modal_key="wk-k", modal_secret="ws-s")
        print(await client.generate("hello"))
        del client          # never closed
        gc.collect()
        await runner.cleanup()

    asyncio.run(main())
    """
)


def run(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *flags, "-c", LEAK], capture_output=True, text=True, timeout=60
    )


def test_an_unclosed_client_is_one_line_of_our_own() -> None:
    done = run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hi"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "was never closed" in lines[0]
    assert "'async with AsyncClient(...) as client:'" in lines[0]
    assert "await client.aclose()" in lines[0]
    assert "Unclosed" not in done.stderr and "ws-s" not in done.stderr


def test_under_dev_mode_aiohttp_stays_quiet_too() -> None:
    done = run("-X", "dev")
    assert done.returncode == 0, done.stderr
    assert "was never closed" in done.stderr
    assert "Unclosed client session" not in done.stderr
    assert "Unclosed connector" not in done.stderr
