"""Endpoint URL and credential validation at construction (``ClientOptions.build``)."""

from __future__ import annotations

import pytest
from yarl import URL

from modal_llm import AsyncClient, Client, ConfigError


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://[::1:20500/", "one pair of brackets"),
        ("http://]::1[/", "one pair of brackets"),
        ("http://[::1]x/", "after the IPv6 address"),
        ("http://[not-ipv6]/", "not an IPv6 address"),
        ("http://::1:8000/", "must be in brackets"),
        ("http://127.0.0.1:99999/", "from 1 to 65535"),
        ("http://127.0.0.1:0/", "from 1 to 65535"),
        ("http://127.0.0.1:-1/", "from 1 to 65535"),
        ("http://127.0.0.1:http/", "from 1 to 65535"),
        ("ftp://example.com/", "must be an http(s) URL"),
        ("localhost:8000", "must be an http(s) URL"),
        ("example.modal.run", "must be an http(s) URL"),
        ("http:///generate", "no host"),
        ("http://exa mple.com/", "' ' (character 11"),
        (" https://x.modal.run/", "' ' (character 1"),
        ("https://x.modal.run/\n", "'\\n'"),
        ("http://a..b/", "not a valid host name"),
        ("http://%41/", "not a valid host name"),
        ("https://u:p@x.modal.run/", "must not carry credentials"),
    ],
)
def test_every_malformed_url_is_a_config_error(url: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        AsyncClient(url)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_the_url_in_the_message_never_shows_userinfo_or_query() -> None:
    with pytest.raises(ConfigError) as info:
        AsyncClient("http://user:pw@[::1:20500/generate?token=abc")
    message = str(info.value)
    assert "pw" not in message and "abc" not in message and "user" not in message
    assert "[::1:20500/generate" in message


def test_the_sync_client_validates_the_same_way() -> None:
    with pytest.raises(ConfigError, match="65535"):
        Client("http://127.0.0.1:99999/")


@pytest.mark.parametrize(
    "url",
    [
        "https://you--llm-web.modal.run",
        "http://127.0.0.1:8000/v1/generate?x=1",
        "http://[::1]:8000/",
        "http://[fe80::1%25eth0]/",
        "http://localhost:65535",
        "HTTPS://EXAMPLE.COM/",
        "http://bücher.example/",
        "http://host_name.internal:1/",
    ],
)
def test_good_urls_are_accepted(url: str) -> None:
    assert AsyncClient(url).endpoint_url == url


def test_a_bad_url_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODAL_LLM_ENDPOINT_URL", "http://127.0.0.1:70000/")
    with pytest.raises(ConfigError, match=r"\(from \$MODAL_LLM_ENDPOINT_URL\)"):
        AsyncClient()


@pytest.mark.parametrize(
    ("env", "kwargs", "needles"),
    [
        (
            {"MODAL_LLM_KEY": "wk-1"},
            {},
            ["$MODAL_LLM_KEY is set in the environment", "$MODAL_LLM_SECRET is not", "set $MODAL"],
        ),
        (
            {"MODAL_LLM_SECRET": "ws-1"},
            {},
            ["$MODAL_LLM_SECRET is set in the environment", "$MODAL_LLM_KEY is not"],
        ),
        ({}, {"modal_key": "wk-1"}, ["modal_key was passed", "set $MODAL_LLM_SECRET"]),
        ({}, {"modal_secret": "ws-1"}, ["modal_secret was passed", "pass modal_key"]),
    ],
)
def test_a_half_credential_names_what_is_missing_and_where_it_was_read(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], kwargs: dict[str, str], needles: list[str]
) -> None:
    monkeypatch.delenv("MODAL_LLM_KEY", raising=False)
    monkeypatch.delenv("MODAL_LLM_SECRET", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        AsyncClient("https://x.modal.run/", **kwargs)  # type: ignore[arg-type]
    for needle in needles:
        assert needle in str(info.value)
    assert "wk-1" not in str(info.value) and "ws-1" not in str(info.value)


def test_a_host_label_allows_ascii_letters_digits_dash_underscore_and_any_non_ascii() -> None:
    # The label pattern is spelt as the ASCII it refuses (a fast compile on import); this
    # pins it to the set it stands for, character by character.
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    for code in [*range(0x100), 0x7FF, 0xD7FF, 0xD800, 0xE000, 0xFFFF, 0x10000, 0x10FFFF]:
        char = chr(code)
        host = f"a{char}b.example"
        if char in "./?#@:[]":
            continue  # they end the label or the host: other checks apply
        if char in allowed:
            AsyncClient(f"http://{host}/")
        elif code >= 0x80:
            # Any non-ASCII the IDNA encoding aiohttp's resolver applies takes (review R7).
            try:
                (URL(f"http://{host}/").raw_host or "").encode("idna")
            except (UnicodeError, ValueError):
                with pytest.raises(ConfigError, match="IDNA cannot encode it"):
                    AsyncClient(f"http://{host}/")
            else:
                AsyncClient(f"http://{host}/")
        else:
            with pytest.raises(ConfigError):
                AsyncClient(f"http://{host}/")


def test_a_label_over_63_characters_is_refused_at_construction() -> None:
    """Review R7: it used to be accepted, then every call raised a bare UnicodeError."""
    AsyncClient("http://" + "a" * 63 + ".example/")
    with pytest.raises(ConfigError, match="a label is over 63 characters"):
        AsyncClient("http://" + "a" * 64 + ".example/")
