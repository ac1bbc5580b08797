"""Modal proxy-auth headers, and the rule that keeps them on the endpoint's own origin."""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

__all__ = ["CREDENTIAL_HEADERS", "credential_headers", "origin", "same_origin"]

CREDENTIAL_HEADERS: Final = frozenset(
    {"modal-key", "modal-secret", "authorization", "proxy-authorization", "cookie", "set-cookie"}
)
"""The one list of credential headers (lower case): stripped from any request to another
origin (any redirect status, any hop), masked in ``StatusError.headers``, and their values
masked wherever a server echoes them back."""

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


def strip_credentials(headers: dict[str, str]) -> dict[str, str]:
    """A copy of ``headers`` without any credential header."""
    return {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
