"""Client-side stop sequences, including a stop split across pieces."""

from __future__ import annotations

import pytest

from modal_llm import ConfigError
from modal_llm._stop import StopMatcher, normalize_stop


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Hello world"], (), "Hello world"),
        (["Hello", " world"], ("\n\n",), "Hello world"),
        (["Answer: 4", "2\n", "\nQ: next"], ("\n\n",), "Answer: 42"),
        (["ab", "c", "STO", "P after"], ("STOP",), "abc"),
        (["x", "S", "T", "O", "P"], ("STOP",), "x"),
        (["STOP at start"], ("STOP",), ""),
        (["aXb", "Yc"], ("Y", "X"), "a"),
        (["almost ST", "OR"], ("STOP",), "almost STOR"),
        (["end with S"], ("STOP",), "end with S"),
    ],
)
def test_stop_matcher(pieces: list[str], stops: tuple[str, ...], expected: str) -> None:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces) + matcher.finish()
    assert out == expected
    assert StopMatcher(stops).apply("".join(pieces)) == expected


def test_matcher_emits_early_and_stops() -> None:
    matcher = StopMatcher(("\n\n",))
    assert matcher.feed("Hi there") == "Hi there"
    assert matcher.feed("\n") == ""
    assert matcher.feed("\nmore") == ""
    assert matcher.stopped
    assert matcher.feed("ignored") == ""


@pytest.mark.parametrize("bad", [[""], [1], 5, {"a"}])
def test_normalize_stop_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        normalize_stop(bad)  # type: ignore[arg-type]


def test_normalize_stop() -> None:
    assert normalize_stop(None) == ()
    assert normalize_stop("x") == ("x",)
    assert normalize_stop(["a", "b"]) == ("a", "b")
