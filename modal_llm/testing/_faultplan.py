"""The fault proxy's decisions, without I/O: ``FaultConfig``, which fault the next exchange
gets (``choose_fault``), HTTP/1.x framing, and where a cut or a stall lands (``Limiter``)."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Final, Literal

from modal_llm._exceptions import ConfigError

FaultKind = Literal["refuse", "reset", "stall_before", "stall_mid", "cut", "delay", "none"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = (
    "refuse",
    "reset",
    "stall_before",
    "stall_mid",
    "cut",
    "delay",
    "none",
)
KIND_BY_NAME: Final[dict[str, FaultKind]] = {kind: kind for kind in FAULT_KINDS}
CHUNKED_END: Final = b"\r\n0\r\n\r\n"


@dataclass
class FaultConfig:
    """Fault rates (each in [0, 1], summing to at most 1) and knobs; mutable between test phases.

    ``schedule`` forces the next faults, one per request, before the rates apply::

        FaultConfig(cut=0.05, reset=0.05, seed=7)
        FaultConfig(schedule=["stall_before", "none"])
    """

    refuse: float = 0.0
    reset: float = 0.0
    stall_before: float = 0.0
    stall_mid: float = 0.0
    cut: float = 0.0
    delay: float = 0.0
    delay_seconds: float = 0.002
    cut_after: int = 200
    stall_after: int = 200
    seed: int = 0
    schedule: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def rates(self) -> tuple[tuple[FaultKind, float], ...]:
        """The rated faults in draw order (``none`` takes what is left)."""
        return (
            ("refuse", self.refuse),
            ("reset", self.reset),
            ("stall_before", self.stall_before),
            ("stall_mid", self.stall_mid),
            ("cut", self.cut),
            ("delay", self.delay),
        )

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) for a bad rate, rates summing above 1, or a bad knob."""
        for kind, rate in self.rates():
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"FaultConfig.{kind} must be in [0, 1], got {rate!r}")
        total = sum(rate for _, rate in self.rates())
        if total > 1.0 + 1e-9:
            raise ConfigError(f"FaultConfig rates must sum to at most 1, got {total!r}")
        if not self.delay_seconds >= 0.0:
            raise ConfigError(f"FaultConfig.delay_seconds must be >= 0, got {self.delay_seconds!r}")
        if self.cut_after < 0 or self.stall_after < 0:
            raise ConfigError("FaultConfig.cut_after and stall_after must be >= 0")
        unknown = [name for name in self.schedule if name not in KIND_BY_NAME]
        if unknown:
            raise ConfigError(f"unknown fault kinds {unknown!r} in schedule; use {FAULT_KINDS}")


def choose_fault(config: FaultConfig, rng: random.Random) -> FaultKind:
    """Next fault: the head of ``config.schedule`` (consumed), else one draw from ``rng``."""
    if config.schedule:
        name = config.schedule.pop(0)
        kind = KIND_BY_NAME.get(name)
        if kind is None:
            raise ConfigError(f"unknown fault kind {name!r} in schedule; use {FAULT_KINDS}")
        return kind
    config.validate()
    x = rng.random()
    for kind, rate in config.rates():
        if x < rate:
            return kind
        x -= rate
    return "none"


def framing(head: bytes) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of an HTTP/1.x head: start line and header lines, no blank line."""
    length: int | None = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                length = int(value.strip())
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    return (None if chunked else length), chunked


def request_complete(buf: bytes | bytearray) -> bool:
    """Whether ``buf`` holds a whole HTTP request (head and body)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    length, chunked = framing(bytes(buf[:end]))
    if chunked:
        return buf.endswith(CHUNKED_END)
    return len(buf) - (end + 4) >= (length or 0)


class Limiter:
    """Sans-IO: how much of one response to forward before a cut or a stall.

    The stop point is ``after`` bytes into the response, clamped to lie after the head and before
    the response's last byte (see the module docstring).
    """

    __slots__ = ("_after", "_buf", "_chunked", "_point", "_seen", "_sent", "_tail")

    def __init__(self, after: int) -> None:
        self._after = after
        self._buf = bytearray()  # received and not yet released
        self._point: int | None = None  # None until the head is complete
        self._seen = 0
        self._sent = 0
        self._chunked = False
        self._tail = b""  # last bytes seen, to spot the chunked terminator across reads

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Take upstream bytes; return the bytes to forward now and whether the point is reached."""
        self._buf += data
        self._seen += len(data)
        if self._point is None:
            end = self._buf.find(b"\r\n\r\n")  # nothing is released before the head is parsed
            if end < 0:
                return b"", False
            head_end = end + 4
            length, self._chunked = framing(bytes(self._buf[:end]))
            point = max(self._after, head_end)
            if length is not None:
                point = min(point, head_end + length - 1)
            self._point = point
        if self._chunked:
            tail = self._tail + data[-len(CHUNKED_END) :]
            if tail.endswith(CHUNKED_END):
                self._point = min(self._point, self._seen - 5)  # hold back b"0\r\n\r\n"
            self._tail = tail[-len(CHUNKED_END) :]
        return self._release()

    def finish(self) -> tuple[bytes, bool]:
        """The upstream closed: hold back at least the last byte received."""
        if self._seen == 0:
            return b"", False
        last = self._seen - 1
        self._point = last if self._point is None else min(self._point, last)
        return self._release()

    def rest(self) -> bytes:
        """Everything received and not released yet (forwarded once a stall is released)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def _release(self) -> tuple[bytes, bool]:
        assert self._point is not None
        n = max(0, self._point - self._sent)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._sent += len(out)
        return out, self._sent >= self._point
