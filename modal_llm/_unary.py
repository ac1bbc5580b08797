"""The unary consumer of the send path: one POST (retried), Modal's 303 chain of GET polls,
and the parse of the final reply into a ``Completion``."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING

from ._call import Call, Redirect, Reply
from ._decoders import html_page_error, looks_like_html
from ._exceptions import ContractError, ModalLLMError
from ._redirects import next_hop
from ._retry import retry_failed, send_with_retries

if TYPE_CHECKING:
    from ._config import RetryPolicy
    from ._models import Completion
    from ._send import Transport

__all__ = ["follow", "post_and_follow"]


async def post_and_follow(
    transport: Transport, call: Call, url: str, retry: RetryPolicy, max_redirects: int
) -> tuple[Completion, int]:
    """The whole unary call: its ``Completion`` and how many attempts its POST took."""
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
        return await follow(transport, reply, call, url, retry, max_redirects), attempts
    return parse(reply), attempts


async def follow(
    transport: Transport,
    redirect: Redirect,
    call: Call,
    url: str,
    retry: RetryPolicy,
    max_redirects: int,
) -> Completion:
    """Follow Modal's 303 result-URL chain with GET polls (each retried on its own); never
    re-send the POST. ``url`` is the endpoint's, for the credential rule of each hop."""
    clock = asyncio.get_running_loop().time
    reply: Reply | Redirect = redirect
    while isinstance(reply, Redirect):
        target = next_hop(reply, call, url, max_redirects)
        send = partial(transport.fetch, "GET", target, None, call)
        reply, _ = await send_with_retries(send, call, retry, clock)
    return parse(reply)


def parse(reply: Reply) -> Completion:
    """The reply body as a ``Completion``, or ``ContractError``."""
    # Imported here so that ``import modal_llm`` does not pay for pydantic's model
    # machinery; after the first reply this is a dictionary lookup.
    from ._models import parse_reply

    try:
        return parse_reply(reply.body, status_code=reply.status, url=reply.url)
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
