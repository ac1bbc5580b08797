"""Endpoint URL validation: every malformed URL is a ``ConfigError`` at construction."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

from ._exceptions import ConfigError

__all__ = ["url_problem", "validate_endpoint_url"]

# A host label: ASCII letters, digits, "_" and "-", or any non-ASCII (IDN) character. Spelt
# as the ASCII characters it refuses: the same set as [A-Za-z0-9_\-\u0080-\U0010ffff], whose
# range takes re 1.5 ms to compile on every ``import modal_llm``; this takes 0.1 ms.
_HOST_LABEL = re.compile(r"[^\x00-\x2c./:-@\[-\^`{-\x7f]+")
_UNSAFE_IN_URL = re.compile(r"[\x00-\x20\x7f]")


def _shown_url(url: str) -> str:
    """``url`` for a message, as typed (never re-parsed or normalized: the message quotes
    what the user wrote), with userinfo and query values masked as ``redact_url`` does."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    cut = re.search(r"[/?#]", rest)
    authority, tail = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    tail, hash_, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    if query:
        kept = []
        for pair in query.split("&"):
            name, eq, _ = pair.partition("=")
            masked = f"{name}=***" if eq else "***"  # a bare "?token" item is a value
            kept.append(pair if name == "__modal_function_call_id" or not pair else masked)
        query = "&".join(kept)
    return f"{head}{sep}{authority}{path}{question}{query}{hash_}{fragment and '***'}"


def url_problem(url: str) -> str | None:
    """What makes ``url`` unfit to send a request to, in a few words, or ``None``.

    The rules of :func:`validate_endpoint_url` except the one on credentials; also used on
    every redirect's target, so a malformed ``Location`` is a ``RedirectError``, not
    whatever the HTTP library raises when it meets it.
    """
    unsafe = _UNSAFE_IN_URL.search(url)
    if unsafe:
        where_in = f"character {unsafe.start() + 1} of {len(url)}"
        return f"it contains {unsafe.group()!r} ({where_in}); no whitespace or control chars"
    scheme = url.partition(":")[0].lower() if "://" in url else ""
    if scheme not in ("http", "https"):
        return "it must be an http(s) URL, as in https://you--app.modal.run/"
    netloc = url.split("://", 1)[1]
    netloc = re.split(r"[/?#]", netloc, maxsplit=1)[0].rpartition("@")[2]
    if "[" in netloc or "]" in netloc:
        inside, closed, after = netloc.partition("]")
        if not netloc.startswith("[") or not closed or "[" in inside[1:] or "]" in after:
            return "an IPv6 address must be in one pair of brackets, as in http://[::1]:8000/"
        if after and not after.startswith(":"):
            return f"unexpected {after!r} after the IPv6 address"
        import ipaddress

        try:
            ipaddress.IPv6Address(inside[1:])
        except ValueError:
            return f"{inside[1:]!r} between the brackets is not an IPv6 address"
    elif netloc.count(":") > 1:
        return "an IPv6 address must be in brackets, as in http://[::1]:8000/"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        text = str(exc)
        if "Port" in text or "port" in text:
            return "the port must be a number from 1 to 65535"
        return text
    if port == 0:
        return "the port must be a number from 1 to 65535"
    host = parts.hostname
    if not host:
        return "it has no host"
    if "[" not in netloc:
        labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
        if not all(_HOST_LABEL.fullmatch(label) for label in labels):
            return f"{host!r} is not a valid host name"
        # The host as aiohttp sends it (yarl, Punycode for IDN labels), through the codec
        # the resolver applies (getaddrinfo encodes with "idna"): a label over 63 octets
        # (RFC 1035, 2.3.4) would otherwise fail on every call with a bare UnicodeError.
        from yarl import URL  # loaded with aiohttp already

        try:
            encoded = URL(url).raw_host or ""
            encoded.encode("idna")
        except (UnicodeError, ValueError):
            if any(len(label) > 63 for label in labels):
                return f"{host!r} is not a valid host name: a label is over 63 characters"
            return f"{host!r} is not a valid host name: IDNA cannot encode it"
    return None


def validate_endpoint_url(url: str, *, source: str = "") -> SplitResult:
    """Check that ``url`` is an absolute http(s) URL a request can be sent to.

    Rejects, with a ``ConfigError`` that shows the URL (redacted) and says what is wrong: a
    scheme other than http/https, a missing or malformed host (spaces, ``%``, empty labels
    or labels over 63 characters, an IPv6 address without matching brackets or not an IPv6
    address), a port that is not a number from 1 to 65535, whitespace or control characters
    anywhere, and userinfo. ``source`` names where the URL was read (an environment
    variable) for the message.
    """
    problem = url_problem(url)
    if problem is not None:
        where = f" (from ${source})" if source else ""
        raise ConfigError(f"endpoint URL {_shown_url(url)!r}{where} is malformed: {problem}")
    parts = urlsplit(url)
    if any(pair.partition("=")[2] == "***" or pair == "***" for pair in parts.query.split("&")):
        raise ConfigError(
            f"endpoint URL {_shown_url(url)!r} is malformed: a query value is '***', a masked "
            "value copied from a repr or an error"
        )
    if parts.username or parts.password:
        raise ConfigError("endpoint_url must not carry credentials; use modal_key/modal_secret")
    return parts
