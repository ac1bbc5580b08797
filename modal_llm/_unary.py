"""The unary consumer of the send path: one POST (retried), Modal's 303 chain of GET polls,
and the parse of the final reply: a ``Completion``, or only its text."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol, TypeVar

from ._call import Call, Redirect, Reply
from ._decoders import html_page_error, looks_like_html
from ._exceptions import ContractError, ModalLLMError
from ._redirects import next_hop
from ._retry import retry_failed, send_with_retries

if TYPE_CHECKING:
    from ._config import RetryPolicy
    from ._models import Completion
    from ._send import Transport

__all__ = ["completion_of", "follow", "post_and_follow", "text_of"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Parser(Protocol[T_co]):
    """``_models.parse_reply`` or ``_models.reply_text``."""

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
    many attempts its POST took."""
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
    if isinstance(reply, Redirect):
        return await follow(transport, reply, call, url, retry, max_redirects, parse), attempts
    return parse(reply), attempts


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
        reply, _ = await send_with_retries(send, call, retry, clock)
    return parse(reply)


def completion_of(reply: Reply) -> Completion:
    """The reply body as a ``Completion``, or ``ContractError``."""
    return _parse(_parsers()[0], reply)


def text_of(reply: Reply) -> str:
    """Only the generated text of the reply body, or the same ``ContractError``."""
    return _parse(_parsers()[1], reply)


def _parse(parser: Parser[T], reply: Reply) -> T:
    try:
        return parser(reply.body, status_code=reply.status, url=reply.url)
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


_PARSERS: list[tuple[Parser[Completion], Parser[str]]] = []


def _parsers() -> tuple[Parser[Completion], Parser[str]]:
    """``_models``' two parsers, imported on first use so that ``import modal_llm`` does not
    pay for pydantic's model machinery; held here, so a reply costs no import statement."""
    if not _PARSERS:
        from ._models import parse_reply, reply_text

        _PARSERS.append((parse_reply, reply_text))
    return _PARSERS[0]
