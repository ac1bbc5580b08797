"""A reference Modal LLM endpoint: the other side of the wire, for tests, demos and benchmarks.

It speaks the endpoint contract and its streaming extension the way a well-behaved Modal
web endpoint does (422 from FastAPI-style validation, 401 from the proxy, 303 result URLs
after ``hop_time``), with a deterministic toy generator standing in for a model. Every
Modal misbehaviour is a switch on :class:`ServerConfig`, all off by default::

    from modal_llm.server import ServerConfig, create_app, serve, STATS

    async with serve(ServerConfig(pieces=4, rate_limit_every=3, retry_after="0")) as url:
        ...  # POST {"prompt": "hi"} to url

    app = create_app(ServerConfig(work_time=0.2, hop_time=0.05))
    async with serve(app) as url:
        ...
        await app[STATS].wait_for(lambda s: s.generations_finished == 1)

From a shell: ``python -m modal_llm.server --port 8000 --pieces 16 --piece-delay 0.05``
(``modal-llm serve`` runs the same). This package never imports the client.

Its modules, one concern each: ``_config`` (the switches), ``_stats`` (what it saw),
``_contract`` (body validation, proxy auth, reply bodies, the toy generator), ``_faults``
(error statuses, cold starts), ``_script`` (scripted replies), ``_results`` (the 303
emulation), ``_streaming`` (SSE, NDJSON, text), ``_app`` (the handler, :func:`create_app`,
:func:`serve`) and ``_cmdline``.
"""

from __future__ import annotations

from ._app import CONFIG, ENDPOINT, STATS, Endpoint, create_app, serve
from ._cmdline import build_parser, config_from_args, main
from ._config import MODAL_HOP_TIME, RECENT_KEPT, RESULT_QUERY, STREAM_FORMATS, ServerConfig
from ._contract import (
    INTERNAL_ERROR,
    INVALID_CALL,
    INVALID_CREDENTIALS,
    MISSING_CREDENTIALS,
    split_pieces,
    toy_generate,
    validate_body,
)
from ._script import Script, StreamReply
from ._stats import RecordedRequest, ServerStats

__all__ = [
    "CONFIG",
    "ENDPOINT",
    "INTERNAL_ERROR",
    "INVALID_CALL",
    "INVALID_CREDENTIALS",
    "MISSING_CREDENTIALS",
    "MODAL_HOP_TIME",
    "RECENT_KEPT",
    "RESULT_QUERY",
    "STATS",
    "STREAM_FORMATS",
    "Endpoint",
    "RecordedRequest",
    "Script",
    "ServerConfig",
    "ServerStats",
    "StreamReply",
    "build_parser",
    "config_from_args",
    "create_app",
    "main",
    "serve",
    "split_pieces",
    "toy_generate",
    "validate_body",
]
