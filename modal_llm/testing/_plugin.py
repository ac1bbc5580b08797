"""The pytest fixtures (``modal_endpoint``, ``modal_endpoint_factory``) of the plugin that
``pytest_plugins = ["modal_llm.testing"]`` enables; imported only when pytest is installed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from modal_llm._config import ENV_ENDPOINT_URL

from ._threaded import LocalEndpoint


@pytest.fixture
def modal_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalEndpoint]:
    """A running :class:`LocalEndpoint` with the default switches, for one test.

    Its URL is also in ``MODAL_LLM_ENDPOINT_URL`` during the test, so code that builds
    ``AsyncClient()``, ``Client()`` or ``Modal()`` without a URL talks to it. A plain
    (synchronous) fixture: it works in sync and async tests, with pytest-asyncio in auto or
    strict mode, and with no pytest-asyncio at all.
    """
    with LocalEndpoint() as endpoint:
        monkeypatch.setenv(ENV_ENDPOINT_URL, endpoint.url)
        yield endpoint


@pytest.fixture
def modal_endpoint_factory() -> Iterator[Callable[..., LocalEndpoint]]:
    """A function that starts a :class:`LocalEndpoint` with the given switches.

    ``endpoint = modal_endpoint_factory(cold_start=0.5, script=[429, "hi"])``; every one
    started is closed when the test ends. The URL is not put in the environment.
    """
    started: list[LocalEndpoint] = []

    def start(**switches: Any) -> LocalEndpoint:
        endpoint = LocalEndpoint(**switches)
        started.append(endpoint)
        return endpoint.start()

    yield start
    for endpoint in reversed(started):
        endpoint.close()
