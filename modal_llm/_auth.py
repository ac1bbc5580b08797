"""Modal proxy-auth headers, and the rule that keeps them on the endpoint's own origin."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = [
    "CREDENTIAL_HEADERS",
    "credential_headers",
    "is_credential_header",
    "origin",
    "same_origin",
    "secret_values",
    "unmask_url",
    "url_has_credentials",
]

CREDENTIAL_HEADERS: Final = frozenset(
    {"modal-key", "modal-secret", "authorization", "proxy-authorization", "cookie", "set-cookie"}
)
"""The credential headers proper (lower case): masked by name in ``StatusError.headers``,
their values masked however short. ``is_credential_header`` adds the secret-looking names."""

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def credential_headers(modal_key: str | None, modal_secret: str | None) -> dict[str, str]:
    """The ``Modal-Key``/``Modal-Secret`` pair for ``requires_proxy_auth=True`` endpoints."""
    if modal_key is None or modal_secret is None:
        return {}
    return {"Modal-Key": modal_key, "Modal-Secret": modal_secret}


def origin(url: str) -> tuple[str, str, int]:
    """The (scheme, host, port) triple that decides where credentials may go."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    return scheme, (parts.hostname or "").lower(), port


def same_origin(a: str, b: str) -> bool:
    """True when both URLs share scheme, host and port (an https→http hop is not)."""
    return origin(a) == origin(b)


_SECRET_WORDS: Final = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "auth",
        "authorization",
        "authentication",
        "cookie",
        "password",
        "passwd",
        "session",
        "signature",
        "credential",
        "credentials",
    }
)
"""Words of a header name (split at ``-``, ``_``, ``.``) that say it carries a credential:
``X-Api-Key``, ``X-Auth-Token``, ``X-Session-Id``; never ``X-Keyword`` or ``X-Author``."""
_NOT_SECRET: Final = frozenset({"idempotency-key", "modal-routing-affinity-key"})
"""Names with such a word that carry no secret: the client's own per-call key, Modal's
routing header (contract section 3)."""
_WORD_SPLIT: Final = re.compile(r"[-_.]")


def is_credential_header(name: str) -> bool:
    """The one notion of a credential header a request sends (any letter case).

    ``CREDENTIAL_HEADERS`` and any name with a secret word (``_SECRET_WORDS``). Such a
    header is stripped from every request to another origin, its value masked wherever
    a server echoes it, and refused where Ray would pickle it.
    """
    lower = name.lower()
    if lower in CREDENTIAL_HEADERS:
        return True
    if lower in _NOT_SECRET:
        return False
    return not _SECRET_WORDS.isdisjoint(_WORD_SPLIT.split(lower))


def strip_credentials(headers: dict[str, str]) -> dict[str, str]:
    """A copy of ``headers`` without any credential header (``is_credential_header``)."""
    return {k: v for k, v in headers.items() if not is_credential_header(k)}


def unmask_url(url: str, endpoint_url: str) -> str:
    """``url`` with each query value masked as ``***`` (``.result_url`` of an error) given
    back from ``endpoint_url``'s own query, when both share its origin: the client knows
    those values, so a masked result URL still resumes."""
    if "***" not in url or not same_origin(url, endpoint_url):
        return url
    own: dict[str, str] = {}
    for pair in urlsplit(endpoint_url).query.split("&"):
        name, sep, value = pair.partition("=")
        if sep:
            own.setdefault(name, value)
    parts = urlsplit(url)
    query = []
    for pair in parts.query.split("&"):
        name, sep, value = pair.partition("=")
        query.append(f"{name}={own[name]}" if sep and value == "***" and name in own else pair)
    return urlunsplit(parts._replace(query="&".join(query)))


def url_has_credentials(url: str) -> bool:
    """Whether ``url`` carries a credential: userinfo, or a query value (any but Modal's
    ``__modal_function_call_id``; a bare ``?token`` item is a value)."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return True
    for pair in parts.query.split("&") if parts.query else ():
        name, sep, value = pair.partition("=")
        if name != "__modal_function_call_id" and (value or not sep) and pair:
            return True
    return False


MIN_MASKED: Final = 4
"""Values shorter than this are not masked (unless sent in a credential header): masking
``"1"`` or ``"on"`` everywhere would garble every message, and no credential is so short."""


def secret_values(headers: Mapping[str, str], url: str) -> tuple[str, ...]:
    """Every credential-like value a request sends, to mask wherever a server echoes it.

    The values of the credential headers (``CREDENTIAL_HEADERS``) and of any header whose
    name looks secret (api-key, token, secret, auth, cookie... patterns), also each part of
    an ``Authorization``-style ``scheme value`` and each cookie's value; the URL's query
    values (as sent and percent-decoded) and its userinfo (also as the Basic credentials
    aiohttp derives from it). Longest first, so a value containing another is masked whole.
    """
    found: set[str] = set()

    def add(value: str, *, always: bool = False) -> None:
        value = value.strip()
        if value and (always or len(value) >= MIN_MASKED):
            found.add(value)

    for name, value in headers.items():
        if is_credential_header(name):
            lower = name.lower()
            add(value, always=lower in CREDENTIAL_HEADERS)
            scheme, _, credential = value.strip().partition(" ")
            if credential and scheme.isalpha():  # "Bearer <token>": the token alone too
                add(credential)
            if "cookie" in lower:  # "a=1; b=2": each cookie's value
                for item in value.split(";"):
                    add(item.partition("=")[2])
    parts = urlsplit(url)
    for pair in parts.query.split("&") if parts.query else ():
        name, sep, value = pair.partition("=")
        if not sep:  # a bare "?token" item: the whole item is the value
            value = name
        if name != "__modal_function_call_id":
            add(value)
            add(unquote(value.replace("+", " ")))
    if parts.username or parts.password:
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        add(user)
        add(password)
        add(base64.b64encode(f"{user}:{password}".encode()).decode("ascii"))
    return tuple(sorted(found, key=len, reverse=True))
