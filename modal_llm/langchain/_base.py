"""What ``Modal`` and ``ChatModal`` share: settings, clients per event loop and cap, runs.

Neither class has HTTP, retry or parsing logic of its own: every call goes through an
``AsyncClient`` (one per running event loop and concurrency cap) or a blocking ``Client``
(one per cap), built from the same validated ``ClientOptions``.
"""

from __future__ import annotations

import copy
import hmac
import os
import threading
import warnings
from collections.abc import (
    AsyncIterator,
    Iterator,
    Mapping,
)
from typing import Any, Final, cast
from urllib.parse import urlsplit

from langchain_core.language_models import LanguageModelInput
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import (
    ensure_config,
)
from langchain_core.utils import from_env, secret_from_env
from langchain_core.utils.utils import get_pydantic_field_names
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_serializer,
    model_validator,
)

from .._auth import url_has_credentials
from .._client import AsyncClient
from .._config import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_STREAM_FLAG,
    DEFAULT_TIMEOUT,
    ENV_ENDPOINT_URL,
    ENV_KEY,
    ENV_SECRET,
    ClientOptions,
)
from .._exceptions import ConfigError, ModalLLMError, redact_url
from .._stop import normalize_stop
from .._sync import Client
from ._batches import Batches
from ._clients import REQUESTED, LoopClients, alimited, client_cap, limited, requested_limit

__all__ = ["ModalBase", "UnsupportedFeatureError"]

_RESERVED_KWARGS: Final = frozenset({"prompt", "headers", "timeout"})
"""Keys ``model_kwargs`` cannot hold: the client takes them as its own arguments."""


_DIGEST_KEY: Final = os.urandom(16)
"""Keys ``endpoint_digest``: per process, so a digest never helps guess a short secret
(an in-memory LLM cache keeps working; a persistent one misses across processes)."""


class UnsupportedFeatureError(ModalLLMError, NotImplementedError):
    """A LangChain feature the endpoint contract cannot carry.

    The contract is text in (``prompt``), text out (``prompt``): tool calling, structured
    output, token usage and non-text content (images, audio, files) have no place in it.
    Raised before anything is sent, instead of a silently wrong answer.
    """


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


class ModalBase(Batches, BaseModel):
    """Settings and client plumbing shared by ``Modal`` and ``ChatModal`` (a mixin).

    Unknown keyword arguments are moved into ``model_kwargs`` with a ``UserWarning``.
    Settings are validated at construction and read when the first call creates a client.
    """

    # Validation errors must not echo the input: it holds modal_key and modal_secret.
    model_config = ConfigDict(hide_input_in_errors=True)

    endpoint_url: str = Field(default_factory=from_env(ENV_ENDPOINT_URL, default=""))
    """The endpoint's URL; falls back to ``MODAL_LLM_ENDPOINT_URL``."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra JSON keys sent with every prompt (``max_tokens``, ``temperature``, ...)."""
    modal_key: SecretStr | None = Field(default_factory=secret_from_env(ENV_KEY, default=None))
    """Proxy-auth token id sent as ``Modal-Key``; falls back to ``MODAL_LLM_KEY``."""
    modal_secret: SecretStr | None = Field(
        default_factory=secret_from_env(ENV_SECRET, default=None)
    )
    """Proxy-auth token secret sent as ``Modal-Secret``; falls back to ``MODAL_LLM_SECRET``."""
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    """Requests in flight at once per client, and the batch size when the RunnableConfig
    gives no ``max_concurrency``. A config asking for more gets a client that allows it."""
    max_retries: int = DEFAULT_MAX_RETRIES
    """Retries after the first attempt, for connection errors, timeouts, 429 and 5xx."""
    timeout: float | None = None
    """Seconds for connect, first byte and each read; ``None`` keeps the client's
    ``DEFAULT_TIMEOUT`` (long enough for a cold start)."""
    streaming: bool = False
    """Call the endpoint in streaming mode; ``invoke`` then joins the streamed pieces and
    callbacks get ``on_llm_new_token`` for each one."""
    stream_flag: str | None = DEFAULT_STREAM_FLAG
    """JSON key set to ``true`` when streaming (``None`` to send no flag)."""
    tracer_provider: Any = Field(default=None, exclude=True)
    """OpenTelemetry ``TracerProvider`` for the call spans; ``None`` uses the global one
    (docs/observability.md)."""
    meter_provider: Any = Field(default=None, exclude=True)
    """OpenTelemetry ``MeterProvider`` for the metrics; ``None`` uses the global one."""
    capture_content: bool = False
    """Record prompts and replies on the spans (off: they may hold personal data)."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _sync_clients: dict[int, Client] = PrivateAttr(default_factory=dict)
    _async_clients: LoopClients = PrivateAttr(default_factory=LoopClients)

    @model_validator(mode="before")
    @classmethod
    def _build_extra(cls, values: Any) -> Any:
        """Move unknown keyword arguments into ``model_kwargs``, with a warning."""
        if not isinstance(values, dict):
            return values
        known = get_pydantic_field_names(cls)
        extra = dict(values.get("model_kwargs") or {})
        for name in list(values):
            if name in known:
                continue
            if name in extra:
                raise ValueError(f"Found {name} supplied twice.")
            warnings.warn(
                f"{name!r} is not a {cls.__name__} field; it was moved into model_kwargs and "
                "will be sent to the endpoint with every prompt",
                UserWarning,
                stacklevel=4,
            )
            extra[name] = values.pop(name)
        return {**values, "model_kwargs": extra}

    @model_validator(mode="after")
    def _check_settings(self) -> ModalBase:
        """Fail at construction, not at the first call, on a bad URL or option."""
        reserved = _RESERVED_KWARGS.intersection(self.model_kwargs)
        if reserved:
            raise ConfigError(
                f"model_kwargs cannot hold {', '.join(sorted(reserved))}: the client takes "
                "these as its own arguments"
            )
        if self.stream_flag is not None and self.stream_flag in self.model_kwargs:
            # Sent with a unary call, it gets an SSE reply back: "reply is not valid JSON".
            raise ConfigError(
                f"model_kwargs cannot hold {self.stream_flag!r}: it is the stream flag, which "
                "the client sets itself (use streaming=True, or stream()/astream())"
            )
        normalize_stop(self.model_kwargs.get("stop"))
        self._check_model_args(self.model_kwargs)
        self._client_options(self.max_concurrency)
        return self

    def _check_model_args(self, args: dict[str, Any]) -> None:
        """Refuse model arguments the class cannot honour (hook; ``ChatModal`` uses it)."""

    def _client_options(self, cap: int) -> ClientOptions:
        """The client options from the fields as they are now, with ``cap`` in flight."""
        return ClientOptions.build(
            self.endpoint_url or None,
            modal_key=_reveal(self.modal_key),
            modal_secret=_reveal(self.modal_secret),
            max_concurrency=cap,
            max_retries=self.max_retries,
            timeout=DEFAULT_TIMEOUT if self.timeout is None else self.timeout,
            stream_flag=self.stream_flag,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            capture_content=self.capture_content,
        )

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """``["modal_llm", "langchain"]``: the public import path, not the private module."""
        return ["modal_llm", "langchain"]

    @property
    def lc_secrets(self) -> dict[str, str]:
        secrets = {"modal_key": ENV_KEY, "modal_secret": ENV_SECRET}
        if url_has_credentials(self.endpoint_url):  # serialized as a secret, read from env
            secrets["endpoint_url"] = ENV_ENDPOINT_URL
        return secrets

    # -- what is shown: the endpoint URL's query values and userinfo are credentials ------

    def _endpoint_params(self) -> dict[str, Any]:
        """``endpoint_url`` as reprs, params and callbacks show it: a URL that carries a
        credential is masked, with a keyed digest so that two such endpoints stay apart
        (the LLM cache keys on these params)."""
        url = self.endpoint_url
        if not url_has_credentials(url):
            return {"endpoint_url": url}
        digest = hmac.new(_DIGEST_KEY, url.encode(), "sha256").hexdigest()[:16]
        return {"endpoint_url": redact_url(url), "endpoint_digest": digest}

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return {**self._endpoint_params(), "model_kwargs": self.model_kwargs}

    @field_serializer("endpoint_url")
    def _dump_endpoint_url(self, url: str) -> str:
        return redact_url(url) if url_has_credentials(url) else url

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "endpoint_url" and isinstance(value, str):
                value = self._dump_endpoint_url(value)
            yield name, value

    # -- clients ---------------------------------------------------------------------------

    def _fresh_private(self) -> dict[str, Any]:
        return {"_lock": threading.Lock(), "_sync_clients": {}, "_async_clients": LoopClients()}

    def __copy__(self) -> Any:
        # A copy (also model_copy(update=...)) may change the settings: it gets its own
        # clients, built from its own fields on first use.
        clone = super().__copy__()
        object.__setattr__(clone, "__pydantic_private__", self._fresh_private())
        return clone

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        clone = self.__copy__()  # clients and locks are not copied, fields are
        object.__setattr__(clone, "__dict__", copy.deepcopy(self.__dict__, memo))
        return clone

    def _cap(self) -> int:
        return client_cap(self.max_concurrency, REQUESTED.get())

    def _blocking_client(self) -> Client:
        """The blocking client for the sync methods (one per cap, shared by every thread)."""
        cap = self._cap()
        client = self._sync_clients.get(cap)
        if client is None:
            with self._lock:
                client = self._sync_clients.get(cap)
                if client is None:
                    client = Client.from_options(self._client_options(cap))
                    self._sync_clients[cap] = client
        return client

    async def _loop_client(self) -> AsyncClient:
        """The running loop's own ``AsyncClient`` (an aiohttp pool cannot cross loops)."""
        return await self._async_clients.get(self._cap(), self._client_options)

    # -- model arguments -------------------------------------------------------------------

    def _field_args(self) -> dict[str, Any]:
        """Model arguments that come from fields (hook; ``ChatModal``'s ``max_tokens``...)."""
        return {}

    def _field_stops(self) -> tuple[str, ...]:
        """Stop sequences that come from fields (hook; ``ChatModal``'s ``stop``)."""
        return ()

    def _model_args(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The client's keyword arguments: model arguments plus the stop sequences."""
        params = {**self.model_kwargs, **self._field_args(), **kwargs}
        if "prompt" in params:
            raise ConfigError("'prompt' cannot be passed as a model argument")
        self._check_model_args(params)
        # A "stop" in model_kwargs is applied by the client, like the per-call stop.
        stops = normalize_stop(params.pop("stop", None)) + self._field_stops()
        stops += normalize_stop(stop)
        params["stop"] = stops or None
        return params

    def _ls_common(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Tracing parameters (``ls_*``) from the fields, ``model_kwargs`` and this call."""
        args = {**self.model_kwargs, **self._field_args(), **kwargs}
        model = args.get("model")
        params: dict[str, Any] = {
            "ls_provider": "modal",
            # No model argument: the endpoint's host names the deployment.
            "ls_model_name": model
            if isinstance(model, str)
            else (urlsplit(self.endpoint_url).hostname or "modal"),
        }
        temperature = args.get("temperature")
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
            params["ls_temperature"] = float(temperature)
        max_tokens = args.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
            params["ls_max_tokens"] = max_tokens
        try:
            stops = normalize_stop(args.get("stop")) + self._field_stops() + normalize_stop(stop)
        except ConfigError:
            stops = ()
        if stops:
            params["ls_stop"] = list(stops)
        return params

    # -- runs: the RunnableConfig's max_concurrency picks the client ---------------------

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        with requested_limit(config):
            return cast(Any, super()).invoke(input, config, stop=stop, **kwargs)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        with requested_limit(config):
            return await cast(Any, super()).ainvoke(input, config, stop=stop, **kwargs)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        requested = ensure_config(config).get("max_concurrency")
        pieces = cast(Any, super()).stream(input, config, stop=stop, **kwargs)
        return limited(pieces, requested)

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        requested = ensure_config(config).get("max_concurrency")
        pieces = cast(Any, super()).astream(input, config, stop=stop, **kwargs)
        return alimited(pieces, requested)
