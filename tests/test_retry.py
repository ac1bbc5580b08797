"""Retry decisions and Retry-After parsing as tables (pure functions, no I/O)."""

from __future__ import annotations

import email.utils

import pytest

from modal_llm import (
    AuthenticationError,
    ConnectError,
    ContractError,
    EndpointTimeoutError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    StatusError,
    StreamInterruptedError,
)
from modal_llm._retry import is_retryable, parse_retry_after

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "3"}, 3.0),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": " 2.5 "}, 2.5),
        ({"retry-after": "7"}, 7.0),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"Retry-After": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"retry-after-ms": "x", "Retry-After": "9"}, 9.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=NOW) == expected


def status(cls: type[StatusError], code: int, retry_after: float | None = None) -> StatusError:
    return cls(status_code=code, retry_after=retry_after)


POLICY = RetryPolicy()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (status(StatusError, 408), True),
        (status(RateLimitError, 429), True),
        (status(RateLimitError, 429, retry_after=120), True),
        (status(RateLimitError, 429, retry_after=121), False),
        (status(ServerError, 500), True),
        (status(ServerError, 502), True),
        (status(ServerError, 503, retry_after=5), True),
        (status(ServerError, 504), True),
        (status(ServerError, 501), False),
        (status(StatusError, 400), False),
        (status(AuthenticationError, 401), False),
        (status(AuthenticationError, 403), False),
        (status(StatusError, 404), False),
        (status(StatusError, 409), False),
        (status(StatusError, 422), False),
        (ConnectError("refused"), True),
        (ConnectError("cut short", before_response=False), False),
        (EndpointTimeoutError("t", phase="connect"), True),
        (EndpointTimeoutError("t", phase="first_byte"), True),
        (EndpointTimeoutError("t", phase="read"), False),
        (EndpointTimeoutError("t", phase="deadline"), False),
        (ContractError("no prompt"), False),
        (StreamInterruptedError("dropped"), False),
        (ValueError("not ours"), False),
    ],
)
def test_is_retryable(error: BaseException, expected: bool) -> None:
    assert is_retryable(error, POLICY) is expected


def test_policy_knobs() -> None:
    only_429 = RetryPolicy(retry_statuses=frozenset({429}))
    assert not is_retryable(status(ServerError, 503), only_429)
    no_timeouts = RetryPolicy(retry_timeouts=False)
    assert not is_retryable(EndpointTimeoutError("t", phase="first_byte"), no_timeouts)
    assert is_retryable(status(RateLimitError, 429, 300), RetryPolicy(max_retry_after=600))
