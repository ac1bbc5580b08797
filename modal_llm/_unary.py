"""The unary consumer of the send path: one POST (retried), Modal's 303 chain of GET polls,
and the parse of the final reply: a ``Completion``, or only its text."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol, TypeVar

from ._call import Call, Redirect, Reply
from ._decoders import html_page_error, looks_like_html
from ._exceptions import ContractError, ModalLLMError, mask_error
from ._redirects import next_hop, poll_failed
from ._retry import retry_failed, send_with_retries

if TYPE_CHECKING:
    from ._config import RetryPolicy
    from ._models import Completion
    from ._send import Transport

__all__ = ["completion_of", "follow", "post_and_follow", "text_of"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Parser(Protocol[T_co]):
    """``_models.parse_reply``."""

    def __call__(self, body: bytes, *, status_code: int | None = ..., url: object = ...) -> T_co:
        pass


async def post_and_follow(
    transport: Transport,
    call: Call,
    url: str,
    retry: RetryPolicy,
    max_redirects: int,
    parse: Callable[[Reply], T],
) -> tuple[T, int]:
    """The whole unary call: its parsed reply (``completion_of`` or ``text_of``) and how
    many attempts its POST took. Its error leaves masked (``call.secrets``): on the hot
    path this is the call's outermost coroutine under ``generate``, ``complete`` or ``map``."""
    try:
        if call.hooks is None:  # the hot path: attempt 1 inline, the driver only on failure
            try:
                reply: Reply | Redirect = await transport.fetch("POST", url, call.body, call, 1)
                attempts = 1
            except ModalLLMError as exc:
                send = partial(transport.fetch, "POST", url, call.body, call)
                clock = asyncio.get_running_loop().time
                reply, attempts = await retry_failed(exc, send, call, retry, clock)
        else:
            send = partial(transport.fetch, "POST", url, call.body, call)
            clock = asyncio.get_running_loop().time
            reply, attempts = await send_with_retries(send, call, retry, clock)
        try:
            if isinstance(reply, Redirect):
                text = await follow(transport, reply, call, url, retry, max_redirects, parse)
                return text, attempts
            return parse(reply), attempts
        except ModalLLMError as exc:  # a reply that breaks the contract, a refused redirect
            if exc.attempts is None:
                exc.attempts = attempts  # the POST's, as every other error of the call says
            raise
    except ModalLLMError as exc:
        mask_error(exc, call.secrets)
        raise


async def follow(
    transport: Transport,
    redirect: Redirect,
    call: Call,
    url: str,
    retry: RetryPolicy,
    max_redirects: int,
    parse: Callable[[Reply], T],
) -> T:
    """Follow Modal's 303 result-URL chain with GET polls (each retried on its own); never
    re-send the POST. ``url`` is the endpoint's, for the credential rule of each hop."""
    clock = asyncio.get_running_loop().time
    reply: Reply | Redirect = redirect
    while isinstance(reply, Redirect):
        target = next_hop(reply, call, url, max_redirects)
        send = partial(transport.fetch, "GET", target, None, call)
        try:
            reply, _ = await send_with_retries(send, call, retry, clock)
        except ModalLLMError as exc:
            pending = poll_failed(exc, call, url, retry)
            if pending is None:
                raise
            raise pending from exc
    return parse(reply)


def completion_of(reply: Reply) -> Completion:
    """The reply body as a ``Completion``, or ``ContractError``."""
    try:
        return _parse_reply(reply.body, status_code=reply.status, url=reply.url)
    except ContractError:
        # The content-type rule's check on the body, as the stream's text path makes it.
        if looks_like_html(reply.body[:64]):
            raise ContractError(
                html_page_error(reply.content_type, reply.body).message,
                status_code=reply.status,
                body=reply.body,
                url=reply.url,
            ) from None
        raise


def text_of(reply: Reply) -> str:
    """Only the generated text of the reply body (``generate``, ``map``): no ``Completion``.

    A plain parse by pydantic-core's JSON parser (the model's own, about a sixth of the
    model's cost), and pydantic itself is never loaded for it: its ~7,000 objects would
    lengthen every full garbage collection of the process. A body that is not an object
    with a string ``"prompt"`` goes to ``completion_of``, so every error is the model's.
    """
    try:
        data = _parse_json(reply.body)
    except ValueError:
        data = None
    if type(data) is dict:
        text = data.get("prompt")
        if type(text) is str:
            return text
    return completion_of(reply).prompt


# Both parsers are bound on first use, each by a stand-in that imports the real one and
# takes its place: neither ``import modal_llm`` nor ``generate`` pays for pydantic's model
# machinery, and after the first reply no call runs an import statement.


def _load_parse_reply(
    body: bytes, *, status_code: int | None = None, url: object = None
) -> Completion:
    """``_parse_reply`` on first use: bind ``_models.parse_reply``."""
    global _parse_reply
    from ._models import parse_reply

    _parse_reply = parse_reply
    return parse_reply(body, status_code=status_code, url=url)


_parse_reply: Parser[Completion] = _load_parse_reply


def _load_json_parser(body: bytes) -> object:
    """``_parse_json`` on first use: bind pydantic-core's parser (loaded with the client)."""
    global _parse_json
    from pydantic_core import from_json

    # Keys only: generated texts are unique, so caching them would only hold them.
    _parse_json = partial(from_json, cache_strings="keys")
    return _parse_json(body)


_parse_json: Callable[[bytes], object] = _load_json_parser
