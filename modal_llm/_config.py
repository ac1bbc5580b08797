"""Settings as small immutable values, their defaults, and environment resolution.

Every default is a named constant here so that the docs can quote it by name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypedDict

import aiohttp

from ._endpoint import validate_endpoint_url
from ._exceptions import ConfigError
from ._hooks import AttemptHook, EventHooks, check_hooks
from ._lazy import LazyModule

if TYPE_CHECKING:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
else:  # the optional extra: typing.get_type_hints resolves these names on demand
    otel_metrics = LazyModule("opentelemetry.metrics", optional=True)
    otel_trace = LazyModule("opentelemetry.trace", optional=True)

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_MAX_REDIRECTS",
    "DEFAULT_MAX_REPLY_BYTES",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_RETRY_STATUSES",
    "DEFAULT_TIMEOUT",
    "USE_CLIENT_DEFAULT",
    "ClientOptions",
    "ClientSettings",
    "RetryPolicy",
    "Timeout",
    "TimeoutTypes",
    "UseClientDefault",
]

ENV_ENDPOINT_URL: Final = "MODAL_LLM_ENDPOINT_URL"
ENV_KEY: Final = "MODAL_LLM_KEY"
ENV_SECRET: Final = "MODAL_LLM_SECRET"

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""TCP + TLS setup. Modal's edge answers fast; a slow connect means a network problem."""
DEFAULT_FIRST_BYTE_TIMEOUT: Final = 600.0
"""Wait for the response headers. A cold GPU container can take minutes to answer, and
Modal itself answers (or redirects with 303) within 150 s of a warm request."""
DEFAULT_READ_TIMEOUT: Final = 120.0
"""Longest silence between two body chunks once the reply has started."""
DEFAULT_DEADLINE: Final = None
"""No overall bound by default: a slow generation on Modal may legitimately take hours."""
DEFAULT_POOL_TIMEOUT: Final = None
"""Wait for a concurrency slot as long as it takes: fanning out more calls than
``max_concurrency`` just queues them."""

DEFAULT_MAX_RETRIES: Final = 3
"""Retries after the first attempt. One more than openai-python's 2: cold starts and 429s
are routine on Modal and a batch job would rather wait than record a failure."""
DEFAULT_MAX_CONCURRENCY: Final = 32
"""Requests in flight at once per client."""
DEFAULT_RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
INITIAL_RETRY_DELAY: Final = 0.5
MAX_RETRY_DELAY: Final = 8.0
RETRY_JITTER: Final = 0.5
"""Up to this many seconds of random jitter are added to each backoff."""
MAX_RETRY_AFTER: Final = 120.0
"""Longest server-requested delay (Retry-After) honoured; longer raises RateLimitError."""
DEFAULT_MAX_REDIRECTS: Final = 100
"""303 hops to follow. Modal answers one every 150 s, so 100 hops is about 4 hours."""
DEFAULT_MAX_REPLY_BYTES: Final = 32 * 1024 * 1024
"""Largest reply body (or stream) read before ReplyTooLargeError."""
DEFAULT_STREAM_FLAG: Final = "stream"
KEEPALIVE_TIMEOUT: Final = 60.0
DNS_CACHE_TTL: Final = 300
SOCKET_READ_SIZE: Final = 64 * 1024
"""Bytes one read of a plain-TCP socket asks for on asyncio's selector loop (its default:
256 KiB). asyncio allocates each read's full size, then shrinks it to what arrived; glibc
serves 256 KiB from ``mmap`` (above its 128 KiB threshold), so every read cost an
``mmap``, ``mremap``, ``munmap`` and a page fault. 64 KiB comes from the heap."""


class UseClientDefault:
    """The type of ``USE_CLIENT_DEFAULT``: "not passed, use the client's setting".

    A per-call ``timeout=`` defaults to ``USE_CLIENT_DEFAULT`` so that ``timeout=None`` can
    mean "no timeout" (httpx's ``USE_CLIENT_DEFAULT`` idea). Annotate a wrapper's parameter
    as ``TimeoutTypes | UseClientDefault`` to pass the choice through. A singleton.
    """

    _instance: UseClientDefault | None = None

    def __new__(cls) -> UseClientDefault:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"

    def __bool__(self) -> bool:
        return False


USE_CLIENT_DEFAULT: Final = UseClientDefault()
"""Passed as ``timeout=``: use the client's own ``timeout``."""

_UNSET: Final = object()


def _check_seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"timeout {name} must be a number of seconds or None, not {value!r}")
    if not value > 0 or math.isnan(value):
        raise ConfigError(f"timeout {name} must be > 0 seconds, not {value!r}")
    if value == math.inf:
        return None  # unbounded, as None (trio and anyio read inf so too)
    return float(value)


@dataclass(frozen=True, slots=True, init=False)
class Timeout:
    """Timeouts named after what they bound, in seconds (``None`` or ``math.inf`` means
    unbounded; ``inf`` is stored as ``None``).

    Usage::

        Timeout()                      # the defaults
        Timeout(30.0)                  # connect, first_byte and read all 30 s
        Timeout(30.0, first_byte=600)  # ... but wait up to 10 min for a cold start
        Timeout(deadline=900)          # the whole call, all attempts and 303 hops, 15 min
        Timeout(pool=5)                # give up after 5 s without a free concurrency slot

    A plain number sets ``connect``, ``first_byte`` and ``read`` (as httpx does). It does not
    set ``deadline``, which bounds the whole logical call including retries, backoff and
    every 303 hop: a per-phase number must not cut a long stream or a slow generation short.
    Nor does it set ``pool``, the wait for one of the client's ``max_concurrency`` slots
    before each attempt (``None``, the default, waits as long as it takes; expiry raises
    ``PoolTimeoutError``). ``deadline`` covers slot waits too.
    """

    connect: float | None
    first_byte: float | None
    read: float | None
    deadline: float | None
    pool: float | None

    def __init__(
        self,
        default: float | object | None = _UNSET,
        *,
        connect: float | object | None = _UNSET,
        first_byte: float | object | None = _UNSET,
        read: float | object | None = _UNSET,
        deadline: float | object | None = _UNSET,
        pool: float | object | None = _UNSET,
    ) -> None:
        base = _check_seconds("default", default) if default is not _UNSET else _UNSET
        parts = {
            "connect": (connect, DEFAULT_CONNECT_TIMEOUT),
            "first_byte": (first_byte, DEFAULT_FIRST_BYTE_TIMEOUT),
            "read": (read, DEFAULT_READ_TIMEOUT),
        }
        for name, (given, fallback) in parts.items():
            if given is not _UNSET:
                value = _check_seconds(name, given)
            else:
                value = fallback if base is _UNSET else base  # type: ignore[assignment]
            object.__setattr__(self, name, value)
        dl = DEFAULT_DEADLINE if deadline is _UNSET else _check_seconds("deadline", deadline)
        object.__setattr__(self, "deadline", dl)
        pl = DEFAULT_POOL_TIMEOUT if pool is _UNSET else _check_seconds("pool", pool)
        object.__setattr__(self, "pool", pl)

    def replace(self, **changes: float | None) -> Timeout:
        """A copy with some parts changed (``dataclasses.replace`` cannot see our ``__init__``)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(changes)
        return Timeout(**values)

    def to_aiohttp(self, *, streaming: bool) -> aiohttp.ClientTimeout:
        """The aiohttp timeout for one HTTP request (one attempt, one hop: never the call).

        Either way the client switches the socket to ``read`` once the headers are in, so
        the long cold-start wait never applies between body chunks.
        """
        if streaming:
            # A stream may run for as long as its chunks keep coming, so no total here:
            # sock_read bounds the wait for the headers.
            return aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=self.connect, sock_read=self.first_byte
            )
        # One request with a small reply: the client watches the first byte itself with
        # shared coarse timers (``_watch``), far cheaper than an aiohttp timer per request.
        return aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=self.connect, sock_read=None
        )


DEFAULT_TIMEOUT: Final = Timeout()

TimeoutTypes = float | Timeout | None


def coerce_timeout(value: TimeoutTypes) -> Timeout:
    """Turn what a caller passed as ``timeout=`` into a ``Timeout``."""
    if isinstance(value, Timeout):
        return value
    if value is None:
        return Timeout(None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"timeout must be a number, a Timeout or None, not {value!r}")
    return Timeout(value)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before trying again.

    Usage::

        RetryPolicy()                                  # the defaults below
        RetryPolicy(max_retries=0)                     # never retry
        RetryPolicy(wait_initial=0, wait_max=0, jitter=0)   # tests: retry without sleeping
        RetryPolicy(retry_statuses=frozenset({429, 503}))

    Backoff before retry n (1-based) is ``min(wait_initial * 2**(n-1) + U(0, jitter),
    wait_max)``, unless the server sent ``Retry-After``: that is honoured up to
    ``max_retry_after`` seconds; a longer request raises ``RateLimitError`` at once.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES
    wait_initial: float = INITIAL_RETRY_DELAY
    wait_max: float = MAX_RETRY_DELAY
    jitter: float = RETRY_JITTER
    max_retry_after: float = MAX_RETRY_AFTER
    retry_timeouts: bool = True
    """Retry a connect or first-byte timeout. The endpoint may have started the work; the
    ``Idempotency-Key`` header lets it recognise the repeat."""

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise ConfigError(f"max_retries must be an int >= 0, not {self.max_retries!r}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, not {self.max_retries}")
        for name in ("wait_initial", "wait_max", "jitter", "max_retry_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name} must be a number >= 0, not {value!r}")  # NaN too
        object.__setattr__(self, "retry_statuses", frozenset(self.retry_statuses))


class ClientSettings(TypedDict, total=False):
    """Keyword options shared by ``AsyncClient``, ``Client`` and ``ClientOptions.build``."""

    modal_key: str | None
    modal_secret: str | None
    headers: Mapping[str, str] | None
    max_concurrency: int
    max_retries: int | None
    timeout: TimeoutTypes
    retry: RetryPolicy | None
    max_redirects: int
    max_reply_bytes: int
    stream_flag: str | None
    stream_require_done: bool
    connection_limit: int | None
    event_hooks: EventHooks | None
    tracer_provider: otel_trace.TracerProvider | None
    meter_provider: otel_metrics.MeterProvider | None
    capture_content: bool


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 9110 token
# RFC 9110 5.5: no control character but HTAB in a value (aiohttp raises ValueError on send).
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _check_header(name: str, value: str) -> None:
    if not isinstance(name, str) or not isinstance(value, str):
        raise ConfigError(f"header names and values must be str, not {name!r}: {type(value)}")
    if not _HEADER_NAME.fullmatch(name):
        raise ConfigError(f"invalid header name {name!r}")
    if _HEADER_VALUE_FORBIDDEN.search(value):
        # Header injection: a CR/LF in a value would let it start a new header line.
        raise ConfigError(f"header {name!r} has a CR, LF, NUL or other control character")
    if name.lower() in _FRAMING_HEADERS:
        raise ConfigError(
            f"header {name!r} cannot be set: the client frames and routes each request "
            "itself (a Content-Length that does not match the body cuts it or hangs the call)"
        )


# Fields that describe the connection or the message's framing, not the request: RFC 9110
# §7.6.1 (Connection and the hop-by-hop fields it names), §8.6 (Content-Length), §7.2
# (Host), §10.1.1 (Expect), RFC 9112 §6.1 (Transfer-Encoding). Forwarded from an incoming
# request they would desynchronise the connection, so ``headers=`` refuses them, as
# httpx and requests compute them themselves.
_FRAMING_HEADERS: Final = frozenset(
    {
        "connection",
        "content-length",
        "expect",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def validate_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Copy ``headers``, rejecting names or values that could split the header block and
    the connection and framing fields the client sets itself (``ConfigError``)."""
    if not headers:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigError(f"headers must be a mapping of str to str, not {type(headers).__name__}")
    for name, value in headers.items():
        _check_header(name, value)
    return dict(headers)


_MODAL_CREDENTIAL_HEADERS: Final = {"modal-key": "Modal-Key", "modal-secret": "Modal-Secret"}


def _refuse_credential_headers(headers: Mapping[str, str], passed: bool) -> None:
    """Credentials given both as options (or env) and in ``headers=``: one would silently win."""
    for name in headers:
        canonical = _MODAL_CREDENTIAL_HEADERS.get(name.lower())
        if canonical is not None:
            source = "modal_key/modal_secret" if passed else f"{ENV_KEY}/{ENV_SECRET}"
            raise ConfigError(
                f"headers[{name!r}] conflicts with the credentials from {source}; "
                f"pass them once (as modal_key/modal_secret)"
            )


_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_HOSTS or host.endswith(".localhost"):
        return True
    import ipaddress  # lazily: only for credentials over http://

    try:  # only an IP literal counts: a name such as "127.example.com" resolves anywhere
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _credentials(key: object, secret: object) -> tuple[str | None, str | None]:
    """The key and secret from the arguments, else the environment; both or neither."""
    env_key = os.environ.get(ENV_KEY) or None
    env_secret = os.environ.get(ENV_SECRET) or None
    # An empty value counts as missing, as an empty variable does: an empty Modal-Secret
    # header is never what was meant, and the error below names what is missing and where.
    if key == "":
        key = None
    if secret == "":
        secret = None
    found_key = key if key is not None else env_key
    found_secret = secret if secret is not None else env_secret
    if (found_key is None) == (found_secret is None):
        return found_key, found_secret  # type: ignore[return-value]
    if found_key is None:
        have, have_env, missing, missing_env = "modal_secret", ENV_SECRET, "modal_key", ENV_KEY
        given = secret is not None
    else:
        have, have_env, missing, missing_env = "modal_key", ENV_KEY, "modal_secret", ENV_SECRET
        given = key is not None
    if given:
        problem = f"{have} was passed but not {missing}, and ${missing_env} is not set"
        remedy = f"pass {missing} or set ${missing_env}"
    else:
        problem = f"${have_env} is set in the environment but ${missing_env} is not"
        remedy = f"set ${missing_env} too, or unset ${have_env}"
    raise ConfigError(f"{problem}: {remedy} (the key and secret must be given together)")


@dataclass(frozen=True, slots=True, repr=False)
class ClientOptions:
    """Every client setting, resolved and validated once. Strictly private shape."""

    endpoint_url: str
    modal_key: str | None = field(default=None)
    modal_secret: str | None = field(default=None)
    headers: dict[str, str] = field(default_factory=dict)
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    timeout: Timeout = DEFAULT_TIMEOUT
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    stream_flag: str | None = DEFAULT_STREAM_FLAG
    stream_require_done: bool = True
    connection_limit: int = DEFAULT_MAX_CONCURRENCY
    event_hooks: dict[str, tuple[AttemptHook, ...]] = field(default_factory=dict)
    tracer_provider: otel_trace.TracerProvider | None = None
    """OpenTelemetry: None uses the global provider (see docs/observability.md)."""
    meter_provider: otel_metrics.MeterProvider | None = None
    capture_content: bool = False
    """Record prompts and replies on spans (off: they may hold personal data)."""

    def __repr__(self) -> str:
        from ._exceptions import redact_url

        auth = ", auth=***" if self.modal_key else ""
        return (
            f"ClientOptions(endpoint_url={redact_url(self.endpoint_url)!r}{auth}, "
            f"max_concurrency={self.max_concurrency}, max_retries={self.retry.max_retries}, "
            f"timeout={self.timeout!r})"
        )

    @classmethod
    def build(cls, endpoint_url: str | None = None, **kw: object) -> ClientOptions:
        """Resolve env fallbacks and validate; raises ``ConfigError`` naming the bad option."""
        unknown = set(kw) - set(ClientSettings.__annotations__)
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
        url = endpoint_url or os.environ.get(ENV_ENDPOINT_URL, "")
        if not url:
            raise ConfigError(f"no endpoint URL: pass endpoint_url or set {ENV_ENDPOINT_URL}")
        if not isinstance(url, str):
            raise ConfigError(f"endpoint_url must be a str, not {type(url).__name__}")
        parts = validate_endpoint_url(url, source="" if endpoint_url else ENV_ENDPOINT_URL)

        key, secret = _credentials(kw.get("modal_key"), kw.get("modal_secret"))
        if key is not None:
            if not isinstance(key, str) or not isinstance(secret, str):
                raise ConfigError("modal_key and modal_secret must be str")
            _check_header("Modal-Key", key)
            _check_header("Modal-Secret", secret)
            if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
                warnings.warn(
                    "sending Modal-Key/Modal-Secret over plain http:// to a non-loopback host "
                    "exposes them on the network; use https://",
                    UserWarning,
                    stacklevel=3,  # build() <- AsyncClient/Client.__init__ <- the caller
                )

        headers = validate_headers(kw.get("headers"))  # type: ignore[arg-type]
        if key is not None:
            _refuse_credential_headers(headers, kw.get("modal_key") is not None)

        retry = kw.get("retry")
        if retry is None:
            retry = RetryPolicy()
        elif not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, not {retry!r}")
        max_retries = kw.get("max_retries")
        if max_retries is not None:
            given = retry
            retry = dataclasses.replace(retry, max_retries=max_retries)  # type: ignore[arg-type]
            if kw.get("retry") is not None and retry.max_retries != given.max_retries:
                # Two options for one setting: refuse rather than let one silently win.
                raise ConfigError(
                    f"max_retries={retry.max_retries} conflicts with "
                    f"retry=RetryPolicy(max_retries={given.max_retries}); pass one of them, "
                    "e.g. retry=RetryPolicy(..., max_retries=N)"
                )

        timeout = coerce_timeout(kw.get("timeout", DEFAULT_TIMEOUT))  # type: ignore[arg-type]

        def positive_int(name: str, default: int) -> int:
            value = kw.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, not {value!r}")
            return value

        max_concurrency = positive_int("max_concurrency", DEFAULT_MAX_CONCURRENCY)
        limit = kw.get("connection_limit")
        connection_limit = (
            max_concurrency if limit is None else positive_int("connection_limit", max_concurrency)
        )
        if connection_limit < max_concurrency:
            note = "" if "max_concurrency" in kw else " (the default)"
            raise ConfigError(
                f"connection_limit={connection_limit} is below max_concurrency="
                f"{max_concurrency}{note}: requests would wait for a connection while "
                "holding a concurrency slot; raise connection_limit or lower max_concurrency"
            )
        stream_flag = kw.get("stream_flag", DEFAULT_STREAM_FLAG)
        if stream_flag is not None and (not isinstance(stream_flag, str) or not stream_flag):
            raise ConfigError(f"stream_flag must be a non-empty str or None, not {stream_flag!r}")
        tracer_provider = kw.get("tracer_provider")
        if tracer_provider is not None and not hasattr(tracer_provider, "get_tracer"):
            raise ConfigError(
                f"tracer_provider must be an OpenTelemetry TracerProvider, not {tracer_provider!r}"
            )
        meter_provider = kw.get("meter_provider")
        if meter_provider is not None and not hasattr(meter_provider, "get_meter"):
            raise ConfigError(
                f"meter_provider must be an OpenTelemetry MeterProvider, not {meter_provider!r}"
            )
        capture_content = kw.get("capture_content", False)
        if not isinstance(capture_content, bool):
            raise ConfigError(f"capture_content must be a bool, not {capture_content!r}")
        return cls(
            endpoint_url=url,
            modal_key=key,
            modal_secret=secret,
            headers=headers,
            max_concurrency=max_concurrency,
            timeout=timeout,
            retry=retry,
            max_redirects=positive_int("max_redirects", DEFAULT_MAX_REDIRECTS),
            max_reply_bytes=positive_int("max_reply_bytes", DEFAULT_MAX_REPLY_BYTES),
            stream_flag=stream_flag,
            stream_require_done=bool(kw.get("stream_require_done", True)),
            connection_limit=connection_limit,
            event_hooks=check_hooks(kw.get("event_hooks")),
            tracer_provider=tracer_provider,  # type: ignore[arg-type]
            meter_provider=meter_provider,  # type: ignore[arg-type]
            capture_content=capture_content,
        )
