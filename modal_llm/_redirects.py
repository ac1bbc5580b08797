"""Redirects: which are followed (Modal's 303 result-URL chain), the hop limit, and where
credentials may go on each hop."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urljoin

from ._auth import same_origin, strip_credentials
from ._config import RetryPolicy
from ._endpoint import url_problem
from ._exceptions import ModalLLMError, RedirectError, ResultPendingError, redact_url
from ._retry import is_retryable
from ._send import REFUSED_REDIRECTS

if TYPE_CHECKING:
    from ._call import Call, Redirect

__all__ = ["next_hop"]

log = logging.getLogger("modal_llm")


def next_hop(redirect: Redirect, call: Call, endpoint_url: str, max_redirects: int) -> str:
    """Check one redirect and prepare ``call`` for the GET that follows it; return its URL.

    Modal answers 303 with a result URL after 150 s; GETting it never restarts the work.
    301/302/303 are followed with GET. 307/308 would make us re-send the prompt (and pay
    twice), so they raise ``RedirectError``. Past ``max_redirects`` hops,
    ``ResultPendingError`` carries the URL to ``resume()`` from. Credentials go only to the
    endpoint's own origin, on any hop.
    """
    call.hops += 1
    hops = call.hops
    if redirect.status in REFUSED_REDIRECTS:
        raise RedirectError(
            f"{redirect.status} redirect would re-send the prompt; not followed", url=redirect.url
        )
    try:
        target = urljoin(redirect.url, redirect.location)
        cross_origin = not same_origin(endpoint_url, target)
    except ValueError:  # a malformed Location: a bad IPv6 literal, a port out of range
        raise RedirectError("redirect to a malformed URL", url=redirect.url) from None
    if not target.startswith(("http://", "https://")):
        raise RedirectError(f"redirect to a non-HTTP URL {redact_url(target)}", url=redirect.url)
    problem = url_problem(target)  # the endpoint URL's own rules: one error, never aiohttp's
    if problem is not None:
        raise RedirectError(f"redirect to a malformed URL: {problem}", url=redirect.url)
    call.result_url = target
    if hops > max_redirects:
        raise ResultPendingError(
            f"result still pending after {hops - 1} result-URL hops",
            result_url=target,
            hops=hops - 1,
            url=endpoint_url,
        )
    if cross_origin:
        call.headers = strip_credentials(call.headers)
    call.headers.pop("Content-Type", None)
    log.debug("following %d to the result URL (hop %d)", redirect.status, hops)
    return target


def poll_failed(
    error: ModalLLMError, call: Call, endpoint_url: str, retry: RetryPolicy
) -> ResultPendingError | None:
    """What a GET of a result URL that failed past its retries becomes, if not itself.

    A transient failure (one ``retry`` would have retried: a 5xx, a 429, a lost
    connection, a timeout) says nothing about the work, which Modal keeps running: it
    becomes ``ResultPendingError`` with the URL to ``resume()`` from and the failure as its
    ``__cause__`` (the caller raises it ``from error``), so a job-level retry polls
    instead of re-sending the prompt (contract §3: never pay for the work twice).
    Anything else (a 404 for an expired result, a contract break) is the call's answer
    and stays as it is: ``None``.
    """
    if call.result_url is None or not is_retryable(error, retry):
        return None
    tries = f" after {error.attempts} attempts" if error.attempts and error.attempts > 1 else ""
    return ResultPendingError(
        f"polling the result URL failed{tries} ({type(error).__name__}: {error.message}); "
        "the work may still be running",
        result_url=call.result_url,
        hops=call.hops,
        url=endpoint_url,
    )
