"""What a user sees when a client or a stream is left open (issue 12, item 10; issue 10.9c)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
