"""Test your own code against a real local Modal LLM endpoint: no Modal account, no mocks.

The reference endpoint (:mod:`modal_llm.server`) runs on a free loopback port and answers
over real HTTP, so redirects, streams, resets and timeouts behave as they do on Modal.
Every misbehaviour is a switch; a script gives exact replies; every request is recorded::

    from modal_llm.testing import LocalEndpoint, local_endpoint

    async with local_endpoint(script=[429, 503, "hello"]) as endpoint:   # on the running loop
        ...                                     # AsyncClient(endpoint.url)
        assert [r.status for r in endpoint.posts] == [429, 503, 200]

    with LocalEndpoint(cold_start=0.5) as endpoint:   # on its own thread: Client, LangChain
        ...

As a pytest plugin (not auto-loaded), in a ``conftest.py``::

    pytest_plugins = ["modal_llm.testing"]

gives the ``modal_endpoint`` and ``modal_endpoint_factory`` fixtures. :class:`FaultProxy`
sits between a client and any endpoint and breaks the TCP stream itself (refuse, reset,
stall, cut, delay). :func:`endpoint_process` runs the endpoint in a process of its own
(for Ray workers or benchmarks). See docs/testing.md. ``import modal_llm`` never imports
this package; it needs nothing beyond modal-llm's own dependencies (pytest only for the
fixtures).
"""

from __future__ import annotations

import importlib.util

from modal_llm.server import RecordedRequest, ServerConfig, ServerStats, StreamReply

from ._faultplan import FAULT_KINDS, FaultConfig, FaultKind
from ._faultproxy import FaultProxy
from ._local import TEST_DEFAULTS, AsyncLocalEndpoint, BaseLocalEndpoint, local_endpoint
from ._process import endpoint_process
from ._threaded import LocalEndpoint, ServerThread

if importlib.util.find_spec("pytest") is not None:  # the plugin's fixtures, for pytest
    from ._plugin import modal_endpoint, modal_endpoint_factory  # noqa: F401

__all__ = [
    "FAULT_KINDS",
    "TEST_DEFAULTS",
    "AsyncLocalEndpoint",
    "BaseLocalEndpoint",
    "FaultConfig",
    "FaultKind",
    "FaultProxy",
    "LocalEndpoint",
    "RecordedRequest",
    "ServerConfig",
    "ServerStats",
    "ServerThread",
    "StreamReply",
    "endpoint_process",
    "local_endpoint",
]
