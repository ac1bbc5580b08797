"""Shared fixtures: loopback endpoints, a retry policy that never sleeps, a clean env."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from modal_llm import RetryPolicy

pytest_plugins = ["modal_llm.testing"]  # the modal_endpoint fixtures, as users enable them

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MakeEndpoint = Callable[..., Awaitable[str]]

NO_WAIT = RetryPolicy(wait_initial=0, wait_max=0, jitter=0)
"""Retries without backoff sleeps (the supported test mode, not a monkeypatch)."""


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """Tests never see a developer's MODAL_LLM_* settings."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MODAL_LLM_")}
    for key in saved:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("MODAL_LLM_")]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture
async def make_endpoint() -> AsyncIterator[MakeEndpoint]:
    """Start an aiohttp server on 127.0.0.1 with one handler for every path; return its URL."""
    servers: list[TestServer] = []

    async def start(handler: Handler, *, path: str = "/") -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url(path))

    yield start
    for server in servers:
        await server.close()
