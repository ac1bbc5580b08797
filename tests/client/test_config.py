"""Options and Timeout values: what is refused at construction, and how."""

from __future__ import annotations

from typing import Any

import pytest

from modal_llm import (
    AsyncClient,
    ConfigError,
    Timeout,
)


def test_timeout_values() -> None:
    assert Timeout(5.0) == Timeout(connect=5.0, first_byte=5.0, read=5.0)
    assert Timeout(5.0).deadline is None
    assert Timeout(5.0, first_byte=60).first_byte == 60.0
    assert Timeout(None).connect is None
    assert Timeout().replace(deadline=10).deadline == 10.0
    assert Timeout().pool is None and Timeout(5.0).pool is None  # a number never sets pool
    assert Timeout(pool=2).pool == 2.0
    with pytest.raises(ConfigError, match="pool"):
        Timeout(pool=0)
    assert "first_byte=600.0" in repr(Timeout())
    with pytest.raises(ConfigError):
        Timeout(-1)
    with pytest.raises(ConfigError):
        Timeout(connect="soon")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "no endpoint URL"),
        ({"endpoint_url": "ftp://x"}, "http"),
        ({"endpoint_url": "https://u:p@x.modal.run"}, "credentials"),
        ({"endpoint_url": "https://x.modal.run", "modal_key": "k"}, "together"),
        ({"endpoint_url": "https://x.modal.run", "headers": {"X-A": "1\r\nEvil: 1"}}, "CR"),
        ({"endpoint_url": "https://x.modal.run", "max_concurrency": 0}, "max_concurrency"),
        ({"endpoint_url": "https://x.modal.run", "max_retries": -1}, "max_retries"),
        ({"endpoint_url": "https://x.modal.run", "timeout": "long"}, "timeout"),
        ({"endpoint_url": "https://x.modal.run", "bogus": 1}, "unknown option"),
    ],
)
def test_bad_configuration_is_a_config_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AsyncClient(**kwargs)


def test_credentials_over_plain_http_warn() -> None:
    with pytest.warns(UserWarning, match="plain http"):
        AsyncClient("http://example.modal.run/", modal_key="k", modal_secret="s")
