"""Conflicting client options (issue 12.9): two options for one setting are refused.

``ClientOptions.build`` is where every option is validated; when two of them say
different things about the same setting, it raises ``ConfigError`` naming both, rather
than letting one silently win.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from modal_llm import AsyncClient, Client, ClientOptions, ConfigError, RetryPolicy

URL = "https://me--llm.modal.run"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"max_retries": 2, "retry": RetryPolicy(max_retries=5)},
            r"max_retries=2 conflicts with retry=RetryPolicy\(max_retries=5\)",
        ),
        (
            {"max_retries": 0, "retry": RetryPolicy(wait_initial=0)},
            r"max_retries=0 conflicts with retry=RetryPolicy\(max_retries=3\)",
        ),
        (
            {"max_concurrency": 32, "connection_limit": 10},
            r"connection_limit=10 is below max_concurrency=32[^ ]",
        ),
        (
            {"connection_limit": 10},
            r"connection_limit=10 is below max_concurrency=32 \(the default",
        ),
        (
            {"modal_key": "k", "modal_secret": "s", "headers": {"modal-key": "other"}},
            r"headers\['modal-key'\] conflicts with the credentials from modal_key/modal_secret",
        ),
    ],
)
def test_conflicting_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ClientOptions.build(URL, **kwargs)
    with pytest.raises(ConfigError, match=match):
        AsyncClient(URL, **kwargs)
    with pytest.raises(ConfigError, match=match):
        Client(URL, **kwargs)


def test_credentials_from_the_environment_conflict_with_header_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODAL_LLM_KEY", "k")
    monkeypatch.setenv("MODAL_LLM_SECRET", "s")
    with pytest.raises(ConfigError, match="MODAL_LLM_KEY/MODAL_LLM_SECRET") as info:
        ClientOptions.build(URL, headers={"Modal-Secret": "other"})
    assert "other" not in str(info.value) and "'s'" not in str(info.value)


def test_options_that_agree_are_accepted() -> None:
    policy = RetryPolicy(max_retries=2, wait_initial=0)
    options = ClientOptions.build(URL, max_retries=2, retry=policy)
    assert options.retry == policy
    assert ClientOptions.build(URL, max_retries=1).retry.max_retries == 1
    assert ClientOptions.build(URL, retry=policy).retry == policy
    options = ClientOptions.build(URL, max_concurrency=8, connection_limit=20)
    assert (options.max_concurrency, options.connection_limit) == (8, 20)
    assert ClientOptions.build(URL, max_concurrency=64).connection_limit == 64
    # Header credentials alone (no modal_key) are the caller's choice.
    assert ClientOptions.build(URL, headers={"Modal-Key": "k"}).headers == {"Modal-Key": "k"}
    assert dataclasses.replace(policy, max_retries=5).max_retries == 5


def test_a_bad_max_retries_is_named_before_any_conflict() -> None:
    with pytest.raises(ConfigError, match="max_retries must be an int"):
        ClientOptions.build(URL, max_retries="2", retry=RetryPolicy())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["Content-Length", "transfer-encoding", "Host", "Connection", "Keep-Alive", "TE", "Upgrade"],
)
async def test_framing_headers_are_refused_before_anything_is_sent(name: str) -> None:
    """Review R30: a forwarded Content-Length that did not match the body cut it (422) or
    left the endpoint waiting for bytes that never came; Host and Transfer-Encoding were
    sent as given. Refused per call and per client, with nothing sent."""
    from modal_llm.testing import local_endpoint

    async with local_endpoint() as endpoint, AsyncClient(endpoint.url) as client:
        with pytest.raises(ConfigError, match=f"header '{name}' cannot be set"):
            await client.generate("hi", headers={name: "5"})
        assert endpoint.posts == []
        assert await client.generate("hi", headers={"X-Request-Id": "r-1"})
    with pytest.raises(ConfigError, match="cannot be set"):
        AsyncClient(endpoint.url, headers={name: "5"})
