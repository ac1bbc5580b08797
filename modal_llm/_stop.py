"""Client-side stop sequences: cut the text at the first stop, also across piece borders."""

from __future__ import annotations

from collections.abc import Sequence

from ._exceptions import ConfigError
from ._types import StopTypes

__all__ = ["StopMatcher", "normalize_stop"]


def normalize_stop(stop: StopTypes) -> tuple[str, ...]:
    """Validate ``stop=`` and return it as a tuple of non-empty strings."""
    if stop is None:
        return ()
    items: Sequence[object] = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"stop must be a str or a list of str, not {type(stop).__name__}")
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"stop sequences must be non-empty strings, not {item!r}")
    return tuple(items)  # type: ignore[arg-type,unused-ignore]


class StopMatcher:
    """Feed text pieces; get back the text that is safe to emit and whether a stop was hit.

    Text that could be the start of a stop sequence is held back until the next piece
    shows whether it is one, so a stop split across two pieces is still found.
    """

    __slots__ = ("_hold", "_pending", "_stops", "stopped")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Return the text to emit now; sets ``stopped`` once a stop sequence is seen."""
        if self.stopped:
            return ""
        if not self._stops:
            return piece
        text = self._pending + piece
        cut = -1
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut = at
        if cut != -1:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        keep = self._held_suffix(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
        for size in range(min(self._hold, len(text)), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0

    def finish(self) -> str:
        """The held-back text at the end of the stream (no stop followed it)."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped else rest

    def apply(self, text: str) -> str:
        """Cut a whole text at its first stop sequence (``generate(stop=...)``)."""
        return self.feed(text) + self.finish()
