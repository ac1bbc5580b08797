"""Redirects: which are followed (Modal's 303 result-URL chain), the hop limit, and where
credentials may go on each hop."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urljoin

from ._auth import same_origin, strip_credentials
from ._endpoint import url_problem
from ._exceptions import RedirectError, ResultPendingError, redact_url
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
