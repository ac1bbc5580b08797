"""ServerConfig: every switch of the reference endpoint, validated, and the wire constants.

Where to add a new fault switch: a field here (with its docstring and its check in
``__post_init__``), its flag in ``_cmdline.py``, and its effect in ``_faults.py`` (a POST
fault), ``_streaming.py`` (a stream fault) or ``_results.py`` (a result-URL fault).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field, fields
from typing import Any

from modal_llm._exceptions import ConfigError

RESULT_QUERY = "__modal_function_call_id"
"""The query parameter of a Modal result URL."""

STREAM_FORMATS = ("sse", "ndjson", "text", "json")

MODAL_HOP_TIME = 150.0
"""How long real Modal lets one HTTP request block before it answers 303."""

RECENT_KEPT = 100
"""How many request bodies and header sets :class:`ServerStats` keeps."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the reference endpoint behaves; every fault is off by default.

    Usage::

        ServerConfig()                                    # a healthy, instant endpoint
        ServerConfig(pieces=16, piece_delay=0.05)         # a slow SSE stream
        ServerConfig(stream_format="ndjson")              # NDJSON instead of SSE
        ServerConfig(cold_start=2.0, latency=0.1)         # slow first byte
        ServerConfig(rate_limit_every=3, retry_after="1") # every 3rd POST: 429, Retry-After: 1
        ServerConfig(error_burst=2, error_status=502)     # first two POSTs: 502
        ServerConfig(failure_rate=0.1, seed=7)            # 10% of POSTs: 500, reproducibly
        ServerConfig(modal_key="wk-1", modal_secret="ws-1")  # proxy auth required
        ServerConfig(work_time=0.2, hop_time=0.05)        # 303 result-URL chain

    POST faults are decided in this order, numbering the POSTs that passed auth: the
    ``error_burst``, then ``rate_limit_every``/``rate_limit_rate``, then ``failure_rate``.
    Each POST draws the same two random numbers whichever switches are on, so a seed gives
    one fault sequence. ``latency`` and ``cold_start`` do not count against ``hop_time``;
    ``work_time`` applies to non-streaming replies only (streams pace with ``piece_delay``).
    """

    pieces: int = 8
    """How many pieces the toy answer is split into when streaming."""
    piece_delay: float = 0.0
    """Seconds between streamed pieces."""
    latency: float = 0.0
    """Seconds before answering each POST (time to first byte)."""
    cold_start: float = 0.0
    """Extra delay for the first POST that gets through (concurrent ones share the wait)."""
    idle_reset: float = 0.0
    """After this many idle seconds the container is cold again (0 = never)."""
    stream_format: str = "sse"
    """"sse" | "ndjson" | "text" | "json": what a streaming request gets; a body's "format"
    key overrides it."""
    rate_limit_every: int = 0
    """Every Nth POST gets 429 (0 = off)."""
    rate_limit_rate: float = 0.0
    """A random fraction of POSTs gets 429."""
    retry_after: str | None = None
    """The Retry-After header on every 429 (seconds or an HTTP date); None sends none."""
    error_burst: int = 0
    """The first N POSTs get ``error_status`` (a 5xx burst while containers start)."""
    error_status: int = 503
    """The status of the ``error_burst`` and of ``poll_error_every`` answers."""
    failure_rate: float = 0.0
    """A random fraction of POSTs gets 500 "modal-http: internal error"."""
    modal_key: str | None = field(default=None, repr=False)
    """With ``modal_secret``: require these Modal-Key/Modal-Secret headers, else 401."""
    modal_secret: str | None = field(default=None, repr=False)
    work_time: float = 0.0
    """Simulated generation time of a non-streaming reply; above ``hop_time`` it runs in the
    background and the POST answers 303 to its result URL."""
    hop_time: float = MODAL_HOP_TIME
    """How long one HTTP request may block before the endpoint answers 303."""
    poll_error_every: int = 0
    """Every Nth GET of a result URL gets ``error_status`` and keeps the result (0 = off)."""
    stream_flag: str = "stream"
    """The body key that asks for a stream."""
    sse_comment_every: int = 0
    """SSE: send a ``: keep-alive`` comment before every Nth piece, the first included."""
    stream_drop_after: int | None = None
    """Close the connection after this many pieces, with no terminator."""
    stream_error_after: int | None = None
    """After this many pieces send an error (SSE ``event: error``, NDJSON ``{"error": ...}``)
    and end; a text stream drops the connection instead."""
    stream_no_terminator: bool = False
    """SSE: end cleanly but without ``data: [DONE]``."""
    split_utf8: bool = False
    """Text streams: cut the bytes evenly, so multibyte characters straddle chunks."""
    echo_prompt: bool = False
    """Start the reply with the prompt, as some completion servers do."""
    seed: int = 0
    """Seeds the random fault choices so runs are reproducible."""
    gate: asyncio.Event | None = field(default=None, compare=False, repr=False)
    """Tests: when set, a stream sends its first piece, then waits for this event."""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.pieces < 1:
            raise ConfigError(f"pieces must be at least 1, not {self.pieces}")
        for name in ("piece_delay", "latency", "cold_start", "idle_reset", "work_time"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.hop_time <= 0:
            raise ConfigError("hop_time must be positive")
        if self.stream_format not in STREAM_FORMATS:
            raise ConfigError(
                f"stream_format must be one of {', '.join(STREAM_FORMATS)}, "
                f"not {self.stream_format!r}"
            )
        for name in ("rate_limit_rate", "failure_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1")
        for name in ("rate_limit_every", "error_burst", "poll_error_every", "sse_comment_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        for name in ("stream_drop_after", "stream_error_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must not be negative")
        if not 400 <= self.error_status <= 599:
            raise ConfigError(f"error_status must be a 4xx or 5xx status, not {self.error_status}")
        if (self.modal_key is None) != (self.modal_secret is None):
            raise ConfigError("modal_key and modal_secret must be set together")
        if not self.stream_flag:
            raise ConfigError("stream_flag must not be empty")


_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}


def _check_types(config: Any) -> None:
    """Every switch holds a value of its declared type (``float`` takes an int; ``bool``
    and ``int`` do not take each other), and a ``float`` is finite: a wrong one is a
    ``ConfigError`` here, not a ``TypeError`` in a handler later."""
    for spec in fields(config):
        declared = [name.strip() for name in str(spec.type).split("|")]
        value = getattr(config, spec.name)
        if (value is None and "None" in declared) or spec.name == "gate":
            continue
        if "bool" in declared:
            ok = isinstance(value, bool)
        else:
            kinds = tuple(kind for name in declared for kind in _KINDS.get(name, ()))
            ok = isinstance(value, kinds) and not isinstance(value, bool)
        if ok and "float" in declared and not math.isfinite(value):
            raise ConfigError(f"{spec.name} must be a finite number, not {value!r}")
        if not ok:
            raise ConfigError(
                f"{spec.name} must be {' or '.join(declared)}, not {type(value).__name__}"
            )
