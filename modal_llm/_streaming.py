"""Streams: ``TextStream`` (what ``AsyncClient.stream()`` returns), and the stream consumer
of the send path: open with retries and 303 hops up to the first piece, then decode."""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from ._call import Call, Redirect, deadline_error, deadline_expired
from ._decoders import StreamDecoder, decoder_for
from ._exceptions import (
    ClientClosedError,
    ConnectError,
    EndpointTimeoutError,
    ModalLLMError,
    StreamError,
    StreamInterruptedError,
    TransportError,
    mask_error,
    redact_url,
)
from ._redirects import next_hop, poll_failed
from ._retry import send_with_retries
from ._send import Opened, Transport
from ._stop import StopMatcher

if TYPE_CHECKING:
    from ._otel import CallScope

__all__ = ["TextStream", "stream_pieces"]

log = logging.getLogger("modal_llm")


class StreamState:
    """The response a stream holds (and its concurrency slot), if any. Shared by
    ``TextStream`` and its generator without a reference cycle, so a dropped stream is freed
    at once, and ``TextStream.__del__`` can release it synchronously whatever keeps the
    generator alive."""

    __slots__ = ("opened",)

    def __init__(self) -> None:
        self.opened: Opened | None = None

    @property
    def open(self) -> bool:
        return self.opened is not None

    def release(self) -> bool:
        """Close the response and free the slot now; True if the stream was still open."""
        opened, self.opened = self.opened, None
        if opened is None:
            return False
        opened.release()
        return True


class TextStream:
    """The text pieces of one streamed reply: an async iterator and an async context manager.

    Usage::

        async with client.stream("Tell me a story") as pieces:
            async for piece in pieces:
                print(piece, end="")

    Leaving the ``async with`` block (normally, by ``break``, an exception or cancellation)
    closes the HTTP response and frees its concurrency slot at once. Used as a plain async
    iterator, the stream is closed when it is read to its end, when it raises, or by
    ``await pieces.aclose()``; a ``break`` alone leaves it open until it is garbage
    collected, which logs a warning (and emits ``ResourceWarning``).
    """

    __slots__ = ("__anext__", "_agen", "_state", "_url")

    if TYPE_CHECKING:  # at run time a slot holding the generator's own bound __anext__

        def __anext__(self) -> Coroutine[Any, Any, str]: ...

    def __init__(self, agen: AsyncGenerator[str, None], state: StreamState, url: str) -> None:
        self._agen = agen
        self._state = state
        self._url = url
        # The next piece is the generator's own ``__anext__``, bound per stream: a slot,
        # not a method, so ``async for`` calls it directly, with no Python frame per piece.
        self.__anext__ = agen.__anext__  # type: ignore[method-assign]

    def __aiter__(self) -> TextStream:
        return self

    def asend(self, value: None) -> Coroutine[Any, Any, str]:
        """As an async generator's ``asend`` (so a ``TextStream`` is one, to type checkers)."""
        return self._agen.asend(value)

    def athrow(self, *args: Any) -> Coroutine[Any, Any, str]:
        """As an async generator's ``athrow``."""
        return self._agen.athrow(*args)

    async def aclose(self) -> None:
        """Close the response and free the slot. Idempotent."""
        await self._agen.aclose()

    async def __aenter__(self) -> TextStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._agen.aclose()

    def __repr__(self) -> str:
        state = "open" if self._state.open else "not open"
        return f"<TextStream {redact_url(self._url)} {state}>"

    def __del__(self, _warnings: Any = warnings) -> None:
        # Release first, synchronously: the generator's own cleanup runs only once it is
        # collected too, which a recorded warning (or anything else holding it) can delay
        # forever. No ``source=self`` either: a recorded warning would keep this alive.
        if self._state.release():
            message = (
                f"a stream from {redact_url(self._url)} was garbage-collected while still "
                "open; use 'async with client.stream(...) as pieces:' or "
                "'await pieces.aclose()' to free its connection and slot"
            )
            log.warning(message)
            _warnings.warn(message, ResourceWarning, stacklevel=1)


class _Delivered:
    """The text handed to the caller so far, for ``partial_text`` if the stream fails.

    Kept compact: every ``_JOIN_EVERY`` pieces are joined into a block, and every
    ``_JOIN_EVERY`` blocks into one, so a stream holds a few strings rather than one object
    per piece (about 70 bytes each, what a service with thousands of open streams pays per
    stream), and each character is copied about twice per 256 pieces.
    """

    __slots__ = ("blocks", "folded", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []  # the stream appends to it directly, then calls fold()
        self.blocks: list[str] = []
        self.folded = 0  # pieces joined into blocks

    @property
    def pieces(self) -> int:
        return self.folded + len(self.parts)

    def add(self, text: str) -> None:
        parts = self.parts
        parts.append(text)
        if len(parts) >= _JOIN_EVERY:
            self.fold()

    def fold(self) -> None:
        """Join the pieces added since the last fold into a block (the list stays the same)."""
        parts = self.parts
        self.folded += len(parts)
        blocks = self.blocks
        blocks.append("".join(parts))
        parts.clear()
        if len(blocks) >= _JOIN_EVERY:
            self.blocks = ["".join(blocks)]

    def text(self) -> str:
        return "".join(self.blocks) + "".join(self.parts)


_JOIN_EVERY: Final = 16


class Opening:
    """A stream opened up to its first piece(s); ``attempts`` its POST took."""

    __slots__ = ("attempts", "decoder", "opened", "pieces", "status")

    def __init__(self, opened: Opened, decoder: StreamDecoder, pieces: list[str]) -> None:
        self.opened = opened
        self.decoder = decoder
        self.pieces = pieces
        self.status = opened.status
        self.attempts = 1


def interrupted(exc: ModalLLMError, sent: _Delivered, response: Opened) -> StreamInterruptedError:
    """The error for a stream that failed mid-body after ``sent``: what ended it
    (``ended_by``) and how much had arrived, in one line."""
    if isinstance(exc, EndpointTimeoutError):
        ended_by = "timeout"
    elif isinstance(exc, ClientClosedError):
        ended_by = "client"
    else:
        ended_by = "connection"
    n = sent.pieces
    detail = exc.message
    if ended_by != "connection":  # a drop's message already counts the bytes
        detail = f"{detail} after {response.received} bytes"
    return StreamInterruptedError(
        f"stream interrupted after {n} piece{'' if n == 1 else 's'}: {detail}",
        partial_text=sent.text(),
        ended_by=ended_by,
        url=response.url,
    )


def broken(exc: ModalLLMError, sent: _Delivered) -> StreamError:
    """The error for a stream that broke the contract or the size cap mid-body after
    ``sent`` (a ``ContractError``, ``ReplyTooLargeError``...: its ``__cause__``)."""
    n = sent.pieces
    excerpt = getattr(exc, "body_excerpt", "")  # what was wrong, as the cause shows it
    detail = f"{exc.message}: {excerpt}" if excerpt else exc.message
    return StreamError(
        f"stream broken after {n} piece{'' if n == 1 else 's'}: {detail}",
        partial_text=sent.text(),
        url=exc.url,
        attempts=exc.attempts,
    )


async def _open_once(
    transport: Transport,
    method: str,
    url: str,
    data: bytes | None,
    call: Call,
    require_done: bool,
    attempt: int,
) -> Opening | Redirect:
    """One attempt: send, then read up to the first piece (a drop before it is retryable)."""
    opened = await transport.open(method, url, data, call, attempt)
    if isinstance(opened, Redirect):
        return opened
    try:
        decoder = decoder_for(opened.content_type, require_done=require_done, max_buffer=opened.cap)
        while True:
            chunk = await opened.chunk()
            if not chunk:
                pieces = decoder.finish()
                if decoder.requires_terminator and not decoder.terminated:
                    raise StreamInterruptedError(
                        "stream ended without its [DONE] terminator", ended_by="eof", url=url
                    )
                decoder.terminated = True
                return Opening(opened, decoder, pieces)
            pieces = decoder.feed(chunk)
            if pieces or decoder.terminated:
                return Opening(opened, decoder, pieces)
    except ModalLLMError as exc:
        if isinstance(exc, ConnectError):
            # Nothing has reached the caller yet, so a drop here is safe to retry.
            exc.before_response = True
        opened.release()
        raise
    except BaseException:
        opened.release()
        raise


async def _open(
    transport: Transport,
    call: Call,
    endpoint_url: str,
    max_redirects: int,
    retry: Any,
    require_done: bool,
) -> Opening:
    """Open the stream up to its first piece, with retries and 303 hops (GET, as unary)."""
    url, method = endpoint_url, "POST"
    data: bytes | None = call.body
    clock = asyncio.get_running_loop().time
    posts = 0
    while True:

        def attempt(n: int, method: str = method, url: str = url, data: Any = data) -> Any:
            return _open_once(transport, method, url, data, call, require_done, n)

        try:
            outcome, attempts = await send_with_retries(attempt, call, retry, clock)
        except ModalLLMError as exc:
            if method == "POST":
                raise
            pending = poll_failed(exc, call, endpoint_url, retry)
            if pending is None:
                raise
            raise pending from exc
        posts = posts or attempts  # as generate() counts: the POST's attempts
        if not isinstance(outcome, Redirect):
            outcome.attempts = posts
            return outcome  # type: ignore[no-any-return]
        url = next_hop(outcome, call, endpoint_url, max_redirects)
        method, data = "GET", None


async def stream_pieces(
    transport_for_loop: Callable[[], Transport],
    scope: Callable[[Call], AbstractContextManager[CallScope | None]],
    call: Call,
    stops: tuple[str, ...],
    state: StreamState,
    *,
    endpoint_url: str,
    max_redirects: int,
    retry: Any,
    require_done: bool,
) -> AsyncGenerator[str, None]:
    """The stream consumer: every piece of one streamed reply, stop sequences applied.

    Runs inside ``scope(call)`` (the client's one start/end of a logical call). Errors
    leave here, and only here: masked, with ``.url`` and ``.attempts`` filled in when the
    layer that raised them could not know them (a decoder, a drop mid-stream). Once a
    piece has reached the caller nothing is retried and a failure carries
    ``partial_text``. The byte cap runs over the whole body (the opening included), since
    the one ``Opened`` counts it.
    """
    with scope(call) as observer:
        sent = _Delivered()
        opened: Opened | None = None
        finished = False
        attempts: int | None = None
        try:
            transport = transport_for_loop()
            opening = _open(transport, call, endpoint_url, max_redirects, retry, require_done)
            if observer is not None:  # the call's span is current while it opens, so
                observer.attach()  # HTTP spans nest; never across a yield (caller's code)
            try:
                if call.deadline_at is None:
                    first = await opening
                else:
                    remaining = call.deadline_at - asyncio.get_running_loop().time()
                    try:
                        first = await asyncio.wait_for(opening, remaining)
                    except asyncio.TimeoutError as exc:
                        if not deadline_expired(exc):
                            raise  # a phase timeout or PoolTimeoutError: not the deadline
                        raise deadline_error(call, endpoint_url) from None
            finally:
                if observer is not None:
                    observer.detach()
            opened = response = first.opened
            decoder, pieces = first.decoder, first.pieces
            attempts = first.attempts
            del opening, first  # held for the stream's life otherwise: memory per open stream
            state.opened = response
            call.first_piece_at = asyncio.get_running_loop().time()  # (or its clean end)
            deadline_at = call.deadline_at
            matcher = StopMatcher(stops) if stops else None
            delivered = sent.parts
            while True:
                if matcher is not None:
                    for piece in pieces:
                        text = matcher.feed(piece)
                        if text:
                            sent.add(text)
                            yield text
                        if matcher.stopped:
                            return  # closes the connection so the endpoint stops generating
                else:  # the usual stream, every piece as it is (never empty) in one loop
                    for text in pieces:
                        delivered.append(text)
                        yield text
                    if len(delivered) >= _JOIN_EVERY:
                        sent.fold()
                error = decoder.error
                if error is not None:  # found after the pieces above, in the same chunk
                    if isinstance(error, StreamError):
                        error.partial_text = sent.text()
                    raise error  # any other: made a StreamError below
                if decoder.terminated:
                    break
                try:
                    chunk = await response.chunk(deadline_at)
                except (TransportError, ClientClosedError) as exc:
                    raise interrupted(exc, sent, response) from exc
                if not chunk:
                    try:
                        pieces = decoder.finish()
                    except StreamError as exc:
                        exc.partial_text = sent.text() + exc.partial_text
                        raise
                    if decoder.requires_terminator and not decoder.terminated:
                        for piece in pieces:  # deliver what did arrive before failing
                            text = piece if matcher is None else matcher.feed(piece)
                            if text:
                                sent.add(text)
                                yield text
                        raise StreamInterruptedError(
                            "stream ended without its [DONE] terminator",
                            partial_text=sent.text(),
                            ended_by="eof",
                            url=response.url,
                        )
                    decoder.terminated = True
                    continue
                try:
                    pieces = decoder.feed(chunk)
                    del chunk  # not held while the caller has the pieces
                except StreamError as exc:
                    # The decoder reports pieces it decoded before the error, in this chunk.
                    exc.partial_text = sent.text() + exc.partial_text
                    raise
            tail = "" if matcher is None else matcher.finish()
            if tail:
                sent.add(tail)
                yield tail
            finished = True
        except ModalLLMError as exc:
            if exc.url is None:
                exc.url = redact_url(endpoint_url if opened is None else opened.url)
            if exc.attempts is None:
                exc.attempts = attempts
            mask_error(exc, call.secrets)
            if opened is not None and not isinstance(exc, StreamError):
                # Past the opening, whatever broke is a StreamError with the text so far,
                # whichever chunk brought it (docs/errors.md).
                error = broken(exc, sent)
                mask_error(error, call.secrets)
                raise error from exc
            raise
        finally:
            state.opened = None
            if opened is not None:
                opened.release(reuse=finished)
            if observer is not None and observer.capture_content:
                observer.reply = sent.text()  # what reached the caller
