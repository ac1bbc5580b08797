"""``Client``: the blocking face of ``AsyncClient``, driven through a loop on a daemon thread.

There is no HTTP, retry, parsing or streaming logic here. ``_portal.LoopThread`` is a
blocking portal (starlette's ``TestClient`` idea turned around): one daemon thread runs one
event loop that owns the ``AsyncClient``, and every blocking method ships a coroutine there
and waits for its result. The caller's thread never runs a loop, so this works inside a
running one (a Jupyter cell) and from many threads sharing one connection pool.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import AsyncGenerator, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from ._batch import BatchResult, ProgressCallback, PromptLike
from ._client import AsyncClient
from ._config import (
    USE_CLIENT_DEFAULT,
    ClientOptions,
    ClientSettings,
    TimeoutTypes,
    UseClientDefault,
)
from ._exceptions import ClientClosedError, ModalLLMError, redact_url
from ._lazy import LazyModule
from ._pacing import AdaptiveConcurrency, RateLimiter
from ._portal import CLOSED_MESSAGE, LoopThread
from ._send import PoolStats
from ._types import HeaderTypes, StopTypes

if sys.version_info >= (3, 11):  # bound at run time too: typing.get_type_hints needs it
    from typing import Unpack
else:
    from typing_extensions import Unpack

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    import modal_llm._models as _models

    P = ParamSpec("P")
else:  # loaded by the first reply, not with the Client (typing.get_type_hints: _lazy.py)
    _models = LazyModule("modal_llm._models")

__all__ = ["Client"]

T = TypeVar("T")


async def _open(options: ClientOptions) -> AsyncClient:
    client = AsyncClient.from_options(options)
    await client.__aenter__()
    return client


async def _next_piece(agen: AsyncGenerator[T, None]) -> T | None:
    # StopAsyncIteration becomes None (the end): it is not an error for the caller.
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None


class Client:
    """A blocking client for a Modal LLM web endpoint: ``AsyncClient`` behind plain calls.

    Usage::

        with Client("https://me--llm-web.modal.run", max_concurrency=16) as client:
            text = client.generate("Identify yourself, bot!", max_tokens=64)
            for piece in client.stream("Tell me a story"):
                print(piece, end="")
            texts = client.generate_many(prompts)   # concurrent, in input order

    Takes the same options as ``AsyncClient``. Safe to share between threads (one pool),
    usable inside a running event loop (Jupyter), and Ctrl-C cancels the waiting call.
    """

    _portal: LoopThread | None = None  # so __repr__ and close() work if __init__ failed

    def __init__(self, endpoint_url: str | None = None, **options: Unpack[ClientSettings]) -> None:
        self._init(ClientOptions.build(endpoint_url, **options))

    @classmethod
    def from_options(cls, options: ClientOptions) -> Client:
        """Build a client from already resolved options (used by the LangChain adapter)."""
        self = cls.__new__(cls)
        self._init(options)
        return self

    def _init(self, options: ClientOptions) -> None:
        portal = LoopThread()
        try:
            client = portal.call(_open, options)
        except BaseException:
            portal.closed = True
            portal.loop.call_soon_threadsafe(portal.loop.stop)
            raise
        self._portal = portal
        self._aclient = client
        self._options = options
        # Runs on close(), on garbage collection and at interpreter exit, whichever is first.
        self._finalizer = weakref.finalize(self, portal.stop, client)

    @property
    def options(self) -> ClientOptions:
        """The resolved settings (credentials are hidden in its repr)."""
        return self._options

    @property
    def endpoint_url(self) -> str:
        return self._options.endpoint_url

    @property
    def closed(self) -> bool:
        portal = self._portal
        return portal is None or (portal.closed and not portal.forked)

    @property
    def pool(self) -> PoolStats:
        """``AsyncClient.pool`` of the client underneath: slots and connections in use/idle.

        Read from the calling thread while the loop thread works, so figures taken during
        calls may be a moment old; once every call has returned they are exact.
        """
        return self._aclient.pool

    def __repr__(self) -> str:
        if self._portal is None:
            return "<Client unopened>"
        state = "closed" if self.closed else "open"
        return f"<Client {redact_url(self._options.endpoint_url)} {state}>"

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Client:
        if self.closed:
            raise ClientClosedError(CLOSED_MESSAGE)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the pool and stop the loop thread. Idempotent; calls in flight fail."""
        if self._portal is not None:
            self._portal.forked = False  # closed in a forked child before its first call
            self._finalizer()

    def _live_portal(self) -> LoopThread:
        portal = self._portal
        if portal is None or portal.closed:
            if portal is not None and portal.forked:
                return self._reopen_after_fork(portal)
            raise ClientClosedError(CLOSED_MESSAGE)
        return portal

    def _reopen_after_fork(self, portal: LoopThread) -> LoopThread:
        """In a child made by ``os.fork()``: a loop thread and pool of its own, on first use.

        The parent's portal and pool stay untouched (``LoopThread.forsake``): the child
        never uses, closes or finalizes the parent's connections.
        """
        with portal.reopening:
            if self._portal is portal:
                portal.left_behind.append(self._aclient)
                self._finalizer.detach()
                self._init(self._options)
        return self._live_portal()

    # -- calls -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> str:
        """Send ``prompt`` (with ``extra`` as model arguments) and return the generated text."""
        return self._live_portal().call(
            self._aclient.generate, prompt, stop=stop, headers=headers, timeout=timeout, **extra
        )

    def complete(
        self,
        prompt: str,
        *,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> _models.Completion:
        """Like ``generate`` but return the whole reply: ``.text`` and ``.data`` (all keys)."""
        return self._live_portal().call(
            self._aclient.complete, prompt, headers=headers, timeout=timeout, **extra
        )

    def resume(
        self,
        result_url: str,
        *,
        max_redirects: int | None = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> _models.Completion:
        """Keep polling a Modal result URL (from ``ResultPendingError.result_url``), with a
        hop budget of its own (``max_redirects``, default the client's)."""
        return self._live_portal().call(
            self._aclient.resume, result_url, max_redirects=max_redirects, timeout=timeout
        )

    @overload
    def generate_many(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: Literal[False] = False,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> list[str]: ...

    @overload
    def generate_many(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: Literal[True],
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> list[str | ModalLLMError]: ...

    def generate_many(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: bool = False,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> list[str] | list[str | ModalLLMError]:
        """Generate for every prompt concurrently (under ``max_concurrency``), in input order."""
        # Materialize here: a generator must not be iterated from the loop thread.
        return self._live_portal().call(
            self._aclient.generate_many,  # type: ignore[arg-type]  # overloads vs ParamSpec
            list(prompts),
            return_exceptions=return_exceptions,
            stop=stop,
            headers=headers,
            timeout=timeout,
            **extra,
        )

    def stream(
        self,
        prompt: str,
        *,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> Generator[str, None, None]:
        """Yield the generated text piece by piece as the endpoint sends it.

        Leaving the loop early (``break``, an exception, Ctrl-C) or ``close()`` on the
        returned generator closes the HTTP response.
        """
        portal = self._live_portal()

        async def open_stream() -> AsyncGenerator[str, None]:
            return self._aclient.stream(
                prompt, stop=stop, headers=headers, timeout=timeout, **extra
            )

        return _pieces(self, portal, portal.call(open_stream))

    def map(
        self,
        items: Iterable[PromptLike],
        *,
        ordered: bool = False,
        concurrency: int | None = None,
        window: int | None = None,
        rate_limit: float | RateLimiter | None = None,
        adaptive: bool | AdaptiveConcurrency = False,
        progress: bool = False,
        on_progress: ProgressCallback | None = None,
        total: int | None = None,
        stop: StopTypes = None,
        headers: HeaderTypes = None,
        timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
        **extra: Any,
    ) -> Generator[BatchResult, None, None]:
        """Blocking ``AsyncClient.map``: one ``BatchResult`` per item, pulled lazily.

        Same options and rules as ``AsyncClient.map`` (docs/batch.md); ``on_progress`` runs
        on the client's loop thread. Invalid options raise ``ConfigError`` here, at once.
        Leaving the loop early cancels what is in flight.
        """
        portal = self._live_portal()

        async def open_map() -> AsyncGenerator[BatchResult, None]:
            return self._aclient.map(
                items,
                ordered=ordered,
                concurrency=concurrency,
                window=window,
                rate_limit=rate_limit,
                adaptive=adaptive,
                progress=progress,
                on_progress=on_progress,
                total=total,
                stop=stop,
                headers=headers,
                timeout=timeout,
                **extra,
            )

        return _pieces(self, portal, portal.call(open_map))


def _pieces(
    owner: Client, portal: LoopThread, agen: AsyncGenerator[T, None]
) -> Generator[T, None, None]:
    """``agen``'s items through the portal. The generator holds its ``owner`` (unused
    otherwise): in ``for p in Client(url).stream(p)`` nothing else keeps the Client alive,
    and its finalizer would close the portal before the first piece."""
    try:
        while True:
            piece = portal.call(_next_piece, agen)
            if piece is None:
                return
            yield piece
    finally:
        portal.close_stream(agen)
