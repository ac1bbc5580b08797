"""Error messages read on one line and never show secrets."""

from __future__ import annotations

import pytest

from modal_llm import (
    ContractError,
    EndpointTimeoutError,
    RateLimitError,
    ResultPendingError,
    StatusError,
    StreamInterruptedError,
)
from modal_llm._exceptions import excerpt, redact_url, status_error_class


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://x--y.modal.run/", "https://x--y.modal.run/"),
        ("https://user:pw@x.modal.run/a", "https://x.modal.run/a"),
        ("https://x.modal.run/a?token=abc&b=2", "https://x.modal.run/a?token=***&b=***"),
        (
            "https://x.modal.run/a?__modal_function_call_id=fc-1",
            "https://x.modal.run/a?__modal_function_call_id=fc-1",
        ),
        ("http://127.0.0.1:8000/#frag", "http://127.0.0.1:8000/"),
        ("https://x.modal.run/a?SECRETTOKEN&b=2", "https://x.modal.run/a?***&b=***"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_status_error_reads_on_one_line() -> None:
    err = RateLimitError(
        status_code=429,
        reason="Too Many Requests",
        body=b'{"detail":\n "slow down"}',
        retry_after=3,
        headers={"Modal-Secret": "ws-x", "Retry-After": "3"},
        url="https://x--y.modal.run/",
        attempts=4,
    )
    assert str(err) == (
        "429 Too Many Requests from https://x--y.modal.run/ after 4 attempts: "
        '(retry after 3s) {"detail": "slow down"}'
    )
    assert err.headers["Modal-Secret"] == "***"


def test_messages() -> None:
    assert "phase" not in str(EndpointTimeoutError("timed out connecting", phase="connect"))
    err = ContractError('reply has no "prompt" key', status_code=200, body=b"{}")
    assert str(err) == 'reply has no "prompt" key (status 200): {}'
    pending = ResultPendingError(
        "pending", result_url="https://a/?__modal_function_call_id=fc", hops=2
    )
    assert "fc" in str(pending)
    assert StreamInterruptedError("cut", partial_text="abc").partial_text == "abc"


def test_excerpt_is_bounded() -> None:
    text = excerpt(b"a" * 1000)
    assert len(text) == 301 and text.endswith("…")
    assert excerpt(b"\xff\xfe bad utf8").startswith("\ufffd")


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (400, "StatusError"),
        (401, "AuthenticationError"),
        (403, "AuthenticationError"),
        (429, "RateLimitError"),
        (500, "ServerError"),
        (503, "ServerError"),
    ],
)
def test_status_mapping(code: int, name: str) -> None:
    assert status_error_class(code).__name__ == name
    assert issubclass(status_error_class(code), StatusError)


def test_mask_error_cleans_every_text_of_an_error_and_its_causes() -> None:
    from modal_llm._exceptions import mask_error

    secret = "ws-secret-value-0123"
    cause = StatusError(status_code=500, body=f"echo {secret}")
    err = StreamInterruptedError(f"cut: {secret}", partial_text=f"text {secret}")
    err.__cause__ = cause
    mask_error(err, (secret,))
    for text in (str(err), repr(err), str(cause), cause.body_excerpt):
        assert secret not in text and "***" in text
    # partial_text is the text the caller was already handed: never rewritten (review R22)
    assert err.partial_text == f"text {secret}"


def test_mask_text_hides_a_secret_cut_by_an_excerpt() -> None:
    from modal_llm._exceptions import mask_text

    secret = "ws-secret-value-0123"
    cut = excerpt(b"x" * 290 + secret.encode())
    assert cut.endswith("…") and secret[:10] in cut
    masked = mask_text(cut, (secret,))
    assert secret[:5] not in masked and masked.endswith("***…")
