"""Progress on stderr for a fan-out: a tqdm bar when tqdm is installed, else a plain counter.

One implementation for ``AsyncClient.map(progress=True)`` and the ``modal-llm`` command.
tqdm is imported only when a ``Progress`` is enabled.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Final

from ._exceptions import ConfigError

__all__ = ["INSTALL_HINT", "Progress"]

INSTALL_HINT: Final = "pip install tqdm"
"""How to get the bar (tqdm is also in the ``progress`` extra)."""


class Progress:
    """Counts results and shows ``done/total``, with failures, on ``file`` (stderr).

    ``total`` is None when unknown. With tqdm missing, ``fallback=True`` prints a plain
    counter (redrawn on a terminal, a line every 2 s otherwise) and sets ``.fallback``;
    ``fallback=False`` raises ``ConfigError`` naming what to install. ``enabled=False``
    shows nothing but still counts.
    """

    def __init__(
        self,
        total: int | None,
        *,
        enabled: bool = True,
        fallback: bool = True,
        unit: str = "prompt",
        file: IO[str] | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.enabled = enabled
        self.fallback = False
        self._file = sys.stderr if file is None else file
        self._bar: Any = None
        self._shown_at = 0.0
        self._closed = False
        self._tty = bool(getattr(self._file, "isatty", lambda: False)())
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            if not fallback:
                raise ConfigError(
                    f"progress=True needs tqdm; install it with: {INSTALL_HINT} "
                    "(or pass on_progress=callback)"
                ) from None
            self.fallback = True
            return
        self._bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=self._file)

    def advance(self, *, failed: bool = False) -> None:
        """Count one result."""
        self.done += 1
        if failed:
            self.failed += 1
        if self._bar is not None:
            if failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
            self._bar.update(1)
        elif self.enabled:
            now = time.monotonic()
            if now - self._shown_at >= (0.1 if self._tty else 2.0):
                self._shown_at = now
                self._show()

    def _show(self, end: str = "") -> None:
        total = "" if self.total is None else f"/{self.total}"
        line = f"{self.done}{total} done, {self.failed} failed"
        if self._tty:
            self._file.write(f"\r{line}{end}")
        else:
            self._file.write(f"{line}\n")
        self._file.flush()

    def message(self, text: str) -> None:
        """Print a line without breaking the bar or the counter."""
        if self._bar is not None:
            self._bar.write(text, file=self._file)
            return
        if self.enabled and self._tty and self._shown_at:
            self._file.write("\n")
            self._shown_at = 0.0
        print(text, file=self._file)

    def close(self) -> None:
        """Draw the final state and end the line. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._show(end="\n")
