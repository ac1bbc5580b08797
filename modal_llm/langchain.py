"""LangChain ``Modal`` LLM backed by modal-llm's clients (the ``langchain`` extra).

A drop-in replacement for ``langchain_community.llms.Modal``::

    from modal_llm.langchain import Modal

    llm = Modal(endpoint_url="https://me--llm-web.modal.run", model_kwargs={"max_tokens": 128})
    chain = PromptTemplate.from_template("Question: {q}\\nAnswer:") | llm
    await chain.ainvoke({"q": "..."})

All HTTP, retry, parsing and streaming work is done by ``AsyncClient`` (one per event loop)
and the blocking ``Client`` (for the sync methods); this module only bridges.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import warnings
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Final

from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from ._batch import gather_bounded
from ._client import AsyncClient
from ._config import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_STREAM_FLAG,
    DEFAULT_TIMEOUT,
    ENV_ENDPOINT_URL,
    ENV_KEY,
    ENV_SECRET,
    ClientOptions,
)
from ._exceptions import ConfigError
from ._sync import Client

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.language_models import LanguageModelInput
    from langchain_core.language_models.llms import LLM
    from langchain_core.outputs import Generation, GenerationChunk, LLMResult
    from langchain_core.runnables import RunnableConfig
    from langchain_core.runnables.config import get_config_list, get_executor_for_config
    from langchain_core.utils import from_env, secret_from_env
    from langchain_core.utils.utils import get_pydantic_field_names
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "modal_llm.langchain needs langchain-core: pip install 'modal-llm[langchain]'"
    ) from exc

__all__ = ["Modal"]


_RESERVED_KWARGS: Final = frozenset({"prompt", "headers", "timeout"})
"""Keys ``model_kwargs`` cannot hold: the client takes them as its own arguments."""


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


def _stop_list(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, (list, tuple)):
        return list(stop)
    raise ConfigError(f"stop must be a str or a list of str, not {type(stop).__name__}")


class _LoopClients:
    """One ``AsyncClient`` per event loop, each closed inside its loop as the loop shuts down.

    ``asyncio.run``, ``asyncio.Runner`` and pytest-asyncio call ``loop.shutdown_asyncgens()``
    before closing their loop. A small async generator parked in each loop (``_closer``)
    is closed then, and it closes that loop's client while the loop can still run it.
    """

    __slots__ = ("__weakref__", "_by_loop", "_lock")

    def __init__(self) -> None:
        self._by_loop: dict[
            asyncio.AbstractEventLoop, tuple[AsyncClient, AsyncGenerator[None, None]]
        ] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_loop)

    async def get(self, options: Callable[[], ClientOptions]) -> AsyncClient:
        """The running loop's client, created (from ``options()``) on first use."""
        loop = asyncio.get_running_loop()
        entry = self._by_loop.get(loop)
        if entry is not None:
            return entry[0]
        with self._lock:
            for stale in [other for other in self._by_loop if other.is_closed()]:
                del self._by_loop[stale]  # closed without shutdown_asyncgens(): too late
            client = AsyncClient.from_options(options())
            closer = _closer(client, weakref.ref(self))
            self._by_loop[loop] = (client, closer)
        await closer.asend(None)  # first iteration: registers it with this loop
        return client

    def forget(self, loop: asyncio.AbstractEventLoop, client: AsyncClient) -> None:
        with self._lock:
            entry = self._by_loop.get(loop)
            if entry is not None and entry[0] is client:
                del self._by_loop[loop]


async def _closer(
    client: AsyncClient, owner: weakref.ref[_LoopClients]
) -> AsyncGenerator[None, None]:
    # Holds its owner weakly: a strong reference would make a cycle, and a cycle is
    # collected with every finalizer run at once, so the client would warn before the
    # loop got the chance to close it. Dropped by reference count, this generator goes
    # to the loop's finalizer hook, which schedules aclose() in its loop.
    loop = asyncio.get_running_loop()
    try:
        yield
    finally:
        registry = owner()
        if registry is not None:
            registry.forget(loop, client)
        await client.aclose()


class Modal(LLM):
    """A Modal LLM web endpoint as a LangChain LLM, backed by modal-llm's pooled clients.

    Usage::

        llm = Modal(endpoint_url="https://me--llm-web.modal.run", model_kwargs={"max_tokens": 64})
        llm.invoke("Identify yourself, bot!")
        await llm.abatch(prompts, config={"max_concurrency": 8})

    Unknown keyword arguments are moved into ``model_kwargs`` with a ``UserWarning``
    (as ``langchain_community.llms.Modal`` does, but with a warning instead of a log line).
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
    """Requests in flight at once, per client (one client per event loop, one for sync)."""
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

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _sync_client: Client | None = PrivateAttr(default=None)
    _async_clients: _LoopClients = PrivateAttr(default_factory=_LoopClients)

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
                f"{name!r} is not a Modal field; it was moved into model_kwargs and will be "
                "sent to the endpoint with every prompt",
                UserWarning,
                stacklevel=4,
            )
            extra[name] = values.pop(name)
        return {**values, "model_kwargs": extra}

    @model_validator(mode="after")
    def _check_settings(self) -> Modal:
        """Fail at construction, not at the first call, on a bad URL or option."""
        reserved = _RESERVED_KWARGS.intersection(self.model_kwargs)
        if reserved:
            raise ConfigError(
                f"model_kwargs cannot hold {', '.join(sorted(reserved))}: the client takes "
                "these as its own arguments"
            )
        _stop_list(self.model_kwargs.get("stop"))
        self._settings()
        return self

    def _settings(self) -> ClientOptions:
        """The client options, from the fields as they are now."""
        return ClientOptions.build(
            self.endpoint_url or None,
            modal_key=_reveal(self.modal_key),
            modal_secret=_reveal(self.modal_secret),
            max_concurrency=self.max_concurrency,
            max_retries=self.max_retries,
            timeout=DEFAULT_TIMEOUT if self.timeout is None else self.timeout,
            stream_flag=self.stream_flag,
        )

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"modal_key": ENV_KEY, "modal_secret": ENV_SECRET}

    @property
    def _llm_type(self) -> str:
        return "modal"

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return {"endpoint_url": self.endpoint_url, "model_kwargs": self.model_kwargs}

    # -- clients ---------------------------------------------------------------------------

    def __copy__(self) -> Modal:
        # A copy (also model_copy(update=...)) may change the settings: it gets its own
        # clients, built from its own fields on first use.
        clone = super().__copy__()
        object.__setattr__(
            clone,
            "__pydantic_private__",
            {"_lock": threading.Lock(), "_sync_client": None, "_async_clients": _LoopClients()},
        )
        return clone

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Modal:
        clone = self.__copy__()  # clients and locks are not copied, fields are
        object.__setattr__(clone, "__dict__", copy.deepcopy(self.__dict__, memo))
        return clone

    def _client(self) -> Client:
        """The blocking client for the sync methods, shared by every thread."""
        client = self._sync_client
        if client is None:
            with self._lock:
                client = self._sync_client
                if client is None:
                    client = self._sync_client = Client.from_options(self._settings())
        return client

    async def _aclient(self) -> AsyncClient:
        """The running loop's own ``AsyncClient`` (an aiohttp pool cannot cross loops)."""
        return await self._async_clients.get(self._settings)

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The client's keyword arguments: model arguments plus the stop sequences."""
        params = {**self.model_kwargs, **kwargs}
        if "prompt" in params:
            raise ConfigError("'prompt' cannot be passed as a model argument")
        # A "stop" in model_kwargs is applied by the client, like the per-call stop.
        stops = _stop_list(params.pop("stop", None)) + _stop_list(stop)
        params["stop"] = stops or None
        return params

    # -- LangChain's hooks -----------------------------------------------------------------

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        if self.streaming:
            return "".join(
                chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs)
            )
        return self._client().generate(prompt, **self._params(stop, kwargs))

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        if self.streaming:
            pieces = [
                chunk.text async for chunk in self._astream(prompt, stop, run_manager, **kwargs)
            ]
            return "".join(pieces)
        client = await self._aclient()
        return await client.generate(prompt, **self._params(stop, kwargs))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        pieces = self._client().stream(prompt, **self._params(stop, kwargs))
        try:
            for piece in pieces:
                chunk = GenerationChunk(text=piece)
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            pieces.close()  # an early exit closes the HTTP response now, not at GC

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        client = await self._aclient()
        pieces = client.stream(prompt, **self._params(stop, kwargs))
        try:
            async for piece in pieces:
                chunk = GenerationChunk(text=piece)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await pieces.aclose()

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Several prompts go out concurrently through ``generate_many``, not one by one."""
        if self.streaming or len(prompts) == 1:
            texts = [self._call(prompt, stop, run_manager, **kwargs) for prompt in prompts]
        else:
            texts = self._client().generate_many(prompts, **self._params(stop, kwargs))
        return LLMResult(generations=[[Generation(text=text)] for text in texts])

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Several prompts go out concurrently (LangChain's ``LLM`` awaits them in turn)."""
        if self.streaming:

            async def one(prompt: str) -> str:
                return await self._acall(prompt, stop, run_manager, **kwargs)

            texts: list[Any] = await gather_bounded(one, prompts, concurrency=self.max_concurrency)
        else:
            client = await self._aclient()
            params = self._params(stop, kwargs)
            if len(prompts) == 1:  # ainvoke: no fan-out machinery for a single prompt
                texts = [await client.generate(prompts[0], **params)]
            else:
                texts = await client.generate_many(prompts, **params)
        return LLMResult(generations=[[Generation(text=text)] for text in texts])

    # -- batches: one LangChain run per prompt, so errors stay per prompt ------------------

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """``invoke`` each input on a thread pool of ``max_concurrency`` (config or field).

        All threads share the one blocking ``Client`` and its pool. With
        ``return_exceptions=True`` a failing input's slot holds its own exception.
        """
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        limit = configs[0].get("max_concurrency") or self.max_concurrency
        pool_config: RunnableConfig = {**configs[0], "max_concurrency": min(limit, len(inputs))}
        results: list[Any] = []
        with get_executor_for_config(pool_config) as executor:
            futures = [
                executor.submit(self.invoke, item, item_config, **kwargs)
                for item, item_config in zip(inputs, configs, strict=True)
            ]
            try:
                for future in futures:
                    try:
                        results.append(future.result())
                    except Exception as exc:
                        if not return_exceptions:
                            raise
                        results.append(exc)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return results

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """``ainvoke`` each input, at most ``max_concurrency`` (config or field) at once.

        With ``return_exceptions=True`` a failing input's slot holds its own exception;
        otherwise the first failure cancels the rest and is raised.
        """
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        limit = configs[0].get("max_concurrency") or self.max_concurrency

        async def one(pair: tuple[LanguageModelInput, RunnableConfig]) -> str:
            return await self.ainvoke(pair[0], pair[1], **kwargs)

        results: list[Any] = await gather_bounded(
            one,
            zip(inputs, configs, strict=True),
            concurrency=min(limit, len(inputs)),
            return_exceptions=return_exceptions,
        )
        return results
