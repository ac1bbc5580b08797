"""Endpoint URL validation: every malformed URL is a ``ConfigError`` at construction."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

from ._exceptions import ConfigError

__all__ = ["validate_endpoint_url"]

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
            kept.append(pair if name == "__modal_function_call_id" else f"{name}{eq}***")
        query = "&".join(kept)
    return f"{head}{sep}{authority}{path}{question}{query}{hash_}{fragment and '***'}"


def validate_endpoint_url(url: str, *, source: str = "") -> SplitResult:
    """Check that ``url`` is an absolute http(s) URL a request can be sent to.

    Rejects, with a ``ConfigError`` that shows the URL (redacted) and says what is wrong: a
    scheme other than http/https, a missing or malformed host (spaces, ``%``, empty labels,
    an IPv6 address without matching brackets or not an IPv6 address), a port that is not a
    number from 1 to 65535, whitespace or control characters anywhere, and userinfo.
    ``source`` names where the URL was read (an environment variable) for the message.
    """
    where = f" (from ${source})" if source else ""

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"endpoint URL {_shown_url(url)!r}{where} is malformed: {problem}")

    unsafe = _UNSAFE_IN_URL.search(url)
    if unsafe:
        where_in = f"character {unsafe.start() + 1} of {len(url)}"
        raise bad(f"it contains {unsafe.group()!r} ({where_in}); no whitespace or control chars")
    scheme = url.partition(":")[0].lower() if "://" in url else ""
    if scheme not in ("http", "https"):
        raise bad("it must be an http(s) URL, as in https://you--app.modal.run/")
    netloc = url.split("://", 1)[1]
    netloc = re.split(r"[/?#]", netloc, maxsplit=1)[0].rpartition("@")[2]
    if "[" in netloc or "]" in netloc:
        inside, closed, after = netloc.partition("]")
        if not netloc.startswith("[") or not closed or "[" in inside[1:] or "]" in after:
            raise bad("an IPv6 address must be in one pair of brackets, as in http://[::1]:8000/")
        if after and not after.startswith(":"):
            raise bad(f"unexpected {after!r} after the IPv6 address")
        import ipaddress

        try:
            ipaddress.IPv6Address(inside[1:])
        except ValueError:
            raise bad(f"{inside[1:]!r} between the brackets is not an IPv6 address") from None
    elif netloc.count(":") > 1:
        raise bad("an IPv6 address must be in brackets, as in http://[::1]:8000/")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        text = str(exc)
        if "Port" in text or "port" in text:
            raise bad("the port must be a number from 1 to 65535") from None
        raise bad(text) from None
    if port == 0:
        raise bad("the port must be a number from 1 to 65535")
    host = parts.hostname
    if not host:
        raise bad("it has no host")
    if "[" not in netloc:
        labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
        if not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise bad(f"{host!r} is not a valid host name")
    if parts.username or parts.password:
        raise ConfigError("endpoint_url must not carry credentials; use modal_key/modal_secret")
    return parts
