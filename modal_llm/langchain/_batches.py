"""LangChain batches for ``Modal`` and ``ChatModal``: ``batch``, ``abatch`` and their
``*_as_completed`` forms, bounded by the run's ``max_concurrency``, with a direct path
for batches nobody observes.

Memory is bounded by the concurrency wherever LangChain's own is bounded by the input:
RunnableConfigs are made one input at a time (``iter_configs``; LangChain's
``get_config_list`` builds every input's dict first), and the ``*_as_completed`` forms
keep at most twice the concurrency pulled from the inputs and not yet yielded
(LangChain's start a coroutine or a future per input before the first result).
"""

from __future__ import annotations

import itertools
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING, Any, TypeVar, cast

from langchain_core.caches import BaseCache
from langchain_core.callbacks import AsyncCallbackManager, BaseCallbackManager, Callbacks
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import LanguageModelInput
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import (
    ensure_config,
    get_config_list,
    get_executor_for_config,
)

from .._batch import as_completed_bounded, gather_bounded
from .._client import AsyncClient
from .._exceptions import ModalLLMError
from ._clients import REQUESTED

__all__ = ["Batches", "iter_configs", "threads_as_completed"]


class Batches:
    """The batch methods of ``ModalBase`` (a mixin before LangChain's classes in the MRO).

    It does no HTTP: the direct path calls the running loop's ``AsyncClient`` through
    ``_batch_call`` (each class's hook), the others LangChain's ``invoke``/``ainvoke``.
    """

    if TYPE_CHECKING:  # ModalBase's, declared here for the type checker only
        max_concurrency: int
        streaming: bool

        def _model_args(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]: ...

        async def _loop_client(self) -> AsyncClient: ...

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """``invoke`` each input on a thread pool of ``max_concurrency`` (config or field).

        All threads share one blocking ``Client`` whose cap allows that many. With
        ``return_exceptions=True`` a failing input's slot holds its own exception.
        """
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        requested = configs[0].get("max_concurrency")
        limit = requested or self.max_concurrency
        pool_config: RunnableConfig = {**configs[0], "max_concurrency": min(limit, len(inputs))}
        invoke = cast(Any, self).invoke
        results: list[Any] = []
        token = REQUESTED.set(requested)
        try:
            # LangChain's executor copies this context into each thread: same client cap.
            with get_executor_for_config(pool_config) as executor:
                futures = [
                    executor.submit(invoke, item, item_config, **kwargs)
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
        finally:
            REQUESTED.reset(token)
        return results

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """``ainvoke`` each input, at most ``max_concurrency`` (config or field) at once.

        With ``return_exceptions=True`` a failing input's slot holds its own exception;
        otherwise the first failure cancels the rest and is raised. When nothing observes
        the runs (no callbacks or tracer, no cache; see docs/langchain.md) the inputs go
        straight to the client with the model arguments worked out once for the batch,
        the same results and errors without LangChain's per-run bookkeeping.
        """
        if not inputs:
            return []
        configs = iter_configs(config, len(inputs))
        requested, limit = self._batch_limit(config, len(inputs))
        token = REQUESTED.set(requested)
        try:
            call = await self._quiet_call(config, kwargs)
            if call is not None:
                replies = await gather_bounded(
                    call, inputs, concurrency=limit, return_exceptions=return_exceptions
                )
                return self._batch_results(replies)
            ainvoke = cast(Any, self).ainvoke

            async def one(pair: tuple[LanguageModelInput, RunnableConfig]) -> Any:
                return await ainvoke(pair[0], pair[1], **kwargs)

            pairs = zip(inputs, configs, strict=True)
            return await gather_bounded(
                one, pairs, concurrency=limit, return_exceptions=return_exceptions
            )
        finally:
            REQUESTED.reset(token)

    def batch_as_completed(
        self,
        inputs: Sequence[LanguageModelInput],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> Iterator[tuple[int, Any]]:
        """``invoke`` each input on ``max_concurrency`` (config or field) threads; yield
        ``(index, output)`` as each finishes. Memory is bounded by the concurrency (at most
        twice it submitted and not yet yielded), not by the inputs. With
        ``return_exceptions=True`` a failing input's output is its exception; otherwise
        the first failure is raised. Leaving early cancels the inputs not yet started."""
        if not inputs:
            return
        configs = iter_configs(config, len(inputs))
        _, limit = self._batch_limit(config, len(inputs))
        invoke = cast(Any, self).invoke

        def one(pair: tuple[LanguageModelInput, RunnableConfig]) -> Any:
            return invoke(pair[0], pair[1], **kwargs)

        first = config[0] if isinstance(config, Sequence) else config
        yield from threads_as_completed(
            one,
            zip(inputs, configs, strict=True),
            concurrency=limit,
            pool_config=ensure_config(first),
            return_exceptions=return_exceptions,
        )

    async def abatch_as_completed(
        self,
        inputs: Sequence[LanguageModelInput],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[tuple[int, Any]]:
        """``abatch``'s runs (its direct path when nothing observes them, else ``ainvoke``
        with callbacks), each ``(index, output)`` yielded as it finishes. Memory is bounded
        by ``max_concurrency`` (at most twice it started and not yet yielded), not by the
        inputs. With ``return_exceptions=True`` a failing input's output is its exception;
        otherwise the first failure is raised and the rest cancelled. Leaving early
        (``break``, ``aclose()``) cancels the runs in flight. See docs/langchain.md."""
        if not inputs:
            return
        configs = iter_configs(config, len(inputs))
        requested, limit = self._batch_limit(config, len(inputs))
        token = REQUESTED.set(requested)
        try:
            call = await self._quiet_call(config, kwargs)
        finally:
            REQUESTED.reset(token)  # before the first yield: the caller's context is its own
        results: AsyncGenerator[tuple[int, Any], None]
        output: Callable[[Any], Any] | None = None
        if call is not None:
            output = self._batch_output
            results = as_completed_bounded(
                call, inputs, concurrency=limit, return_exceptions=return_exceptions
            )
        else:
            ainvoke = cast(Any, self).ainvoke

            async def one(pair: tuple[LanguageModelInput, RunnableConfig]) -> Any:
                return await ainvoke(pair[0], pair[1], **kwargs)

            pairs = zip(inputs, configs, strict=True)
            results = as_completed_bounded(
                one, pairs, concurrency=limit, return_exceptions=return_exceptions
            )
        try:
            async for index, outcome in results:
                if output is not None and not isinstance(outcome, Exception):
                    yield index, output(outcome)
                else:
                    yield index, outcome
        finally:
            await results.aclose()

    def _batch_limit(
        self, config: RunnableConfig | Sequence[RunnableConfig] | None, size: int
    ) -> tuple[int | None, int]:
        """The first config's ``max_concurrency`` (picks the client), and the batch's limit."""
        first = config[0] if isinstance(config, Sequence) else config
        requested: int | None = ensure_config(first).get("max_concurrency")
        return requested, min(requested or self.max_concurrency, size)

    # -- batches nobody observes -----------------------------------------------------------

    def _observed(self, config: RunnableConfig | Sequence[RunnableConfig] | None) -> bool:
        """Whether a run under ``config`` has a callback, tracer or cache to serve."""
        model = cast(Any, self)  # a LangChain model: callbacks, verbose and cache are its own
        if model.callbacks or model.verbose or self.streaming:
            return True
        cache = model.cache
        if cache is not False and (isinstance(cache, BaseCache) or get_llm_cache() is not None):
            return True
        configs = config if isinstance(config, Sequence) else [config]
        first = ensure_config(configs[0])  # also the parent run's config, if any
        # configure() adds what the environment asks for (LangSmith tracing, say).
        manager = AsyncCallbackManager.configure(first.get("callbacks"), None, False)
        if manager.handlers or manager.inheritable_handlers:
            return True
        return any(_has_handlers(c.get("callbacks")) for c in configs[1:] if c)

    async def _quiet_call(
        self, config: RunnableConfig | Sequence[RunnableConfig] | None, kwargs: dict[str, Any]
    ) -> Callable[[LanguageModelInput], Awaitable[Any]] | None:
        """A per-input call for a batch nobody observes, or ``None`` to run LangChain's way.

        ``None`` also when the model arguments are invalid: LangChain's path then raises
        (or, with ``return_exceptions``, returns) the error per input, as it always did.
        """
        if self._observed(config):
            return None
        args = dict(kwargs)
        stop = args.pop("stop", None)
        try:
            params = self._model_args(stop, args)
        except ModalLLMError:
            return None
        client = await self._loop_client()
        return self._batch_call(client, params)

    def _batch_call(
        self, client: AsyncClient, params: dict[str, Any]
    ) -> Callable[[LanguageModelInput], Awaitable[Any]] | None:
        """One input's call (hook; both classes define it). What it returns becomes what
        ``ainvoke`` would have returned in ``_batch_results``."""
        return None

    def _batch_results(self, replies: list[Any]) -> list[Any]:
        """``abatch``'s results from ``_batch_call``'s replies, once every request is done
        (hook; ``ChatModal`` builds its messages here). Exceptions stay as they are."""
        return replies

    def _batch_output(self, reply: Any) -> Any:
        """One reply of ``_batch_call`` as ``ainvoke`` would have returned it (hook)."""
        return reply


def _has_handlers(callbacks: Callbacks) -> bool:
    if callbacks is None:
        return False
    if isinstance(callbacks, BaseCallbackManager):
        return bool(callbacks.handlers or callbacks.inheritable_handlers)
    return bool(callbacks)


T = TypeVar("T")


def iter_configs(
    config: RunnableConfig | Sequence[RunnableConfig] | None, length: int
) -> Iterator[RunnableConfig]:
    """``get_config_list(config, length)``, one config at a time.

    Checked at once, as LangChain checks: a list of the wrong length raises its
    ``ValueError``, and a ``run_id`` in one config for several inputs warns (the first
    input keeps it, the others get none).
    """
    if isinstance(config, Sequence):
        if len(config) != length:
            get_config_list(config, length)  # raises LangChain's own ValueError
        return map(ensure_config, config)
    if length > 1 and isinstance(config, dict) and config.get("run_id") is not None:
        first, rest = get_config_list(config, 2)  # warns as LangChain does
        others = (ensure_config(rest) for _ in range(length - 1))
        return itertools.chain((first,), others)
    return (ensure_config(config) for _ in range(length))


def _indexed(call: Callable[[T], Any], index: int, item: T, catch: bool) -> tuple[int, Any]:
    if not catch:
        return index, call(item)
    try:
        return index, call(item)
    except Exception as exc:
        return index, exc


def threads_as_completed(
    call: Callable[[T], Any],
    items: Iterable[T],
    *,
    concurrency: int,
    pool_config: RunnableConfig,
    return_exceptions: bool = False,
) -> Iterator[tuple[int, Any]]:
    """``(index, call(item))`` for every item as it finishes, on ``concurrency`` threads.

    At most twice ``concurrency`` items are submitted and not yet yielded. The pool is
    LangChain's (``get_executor_for_config(pool_config)``), which runs each call in a copy
    of the submitting context. Without ``return_exceptions`` the first failure is raised;
    leaving early (or a failure) cancels the submitted calls not yet started, and waits
    for the ones running (a thread cannot be interrupted).
    """
    source = enumerate(items)
    window = 2 * concurrency
    pending: set[Future[tuple[int, Any]]] = set()
    with get_executor_for_config({**pool_config, "max_concurrency": concurrency}) as executor:
        try:
            while True:
                for index, item in itertools.islice(source, window - len(pending)):
                    pending.add(executor.submit(_indexed, call, index, item, return_exceptions))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()
