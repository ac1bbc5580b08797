"""Attempt events: what observers (``event_hooks``, fan-out, telemetry) see of each attempt.

``AttemptEvent`` is the public record; ``CallHooks`` is one call's set of subscribers and the
single emitter. The send path emits one event per HTTP request a call sends (every retry
and every 303 poll), after the retry decision (so ``wait`` is known) and before the sleep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ._exceptions import ConfigError, ModalLLMError

__all__ = ["HOOK_KINDS", "AttemptEvent", "AttemptHook", "CallHooks", "EventHooks", "check_hooks"]

log = logging.getLogger("modal_llm")


@dataclass(frozen=True, slots=True)
class AttemptEvent:
    """The outcome of one attempt (one HTTP request) of a logical call.

    Usage::

        def on_attempt(event: AttemptEvent) -> None:
            if event.will_retry:
                print(f"attempt {event.attempt} failed ({event.status}), retry in {event.wait}s")

        AsyncClient(url, event_hooks={"attempt": [on_attempt]})
    """

    attempt: int
    """1-based number of this attempt within the logical call (each 303 poll counts)."""
    status: int | None
    """HTTP status of the reply; ``None`` when none arrived (transport error, timeout)."""
    error: ModalLLMError | None
    """The attempt's error (credentials masked); ``None`` when the attempt succeeded."""
    will_retry: bool
    """Another attempt follows."""
    wait: float | None
    """Seconds slept before the next attempt; ``None`` when none follows."""
    retry_after: bool
    """``wait`` came from the server's ``Retry-After``."""
    elapsed: float
    """Seconds this attempt took, from sending to its outcome."""
    stream: bool
    """The attempt opened a stream (its outcome is known at the first piece)."""


AttemptHook = Callable[[AttemptEvent], None]
"""A synchronous observer; it runs on the event loop and must not block. One that raises
is logged and ignored."""

EventHooks = Mapping[str, Sequence[AttemptHook]]
"""``{"attempt": [...], "failure": [...]}``: "attempt" sees every attempt, "failure" only
failed ones (retried or final)."""

HOOK_KINDS: Final = ("attempt", "failure")


def check_hooks(hooks: object) -> dict[str, tuple[AttemptHook, ...]]:
    """Validate an ``event_hooks`` option; raises ``ConfigError`` naming what is wrong."""
    if hooks is None:
        return {}
    if not isinstance(hooks, Mapping):
        raise ConfigError(f"event_hooks must be a mapping of kind to hooks, not {hooks!r}")
    resolved: dict[str, tuple[AttemptHook, ...]] = {}
    for kind, funcs in hooks.items():
        if kind not in HOOK_KINDS:
            raise ConfigError(
                f"unknown event hook kind {kind!r}; expected one of {', '.join(HOOK_KINDS)}"
            )
        if callable(funcs) or not isinstance(funcs, Iterable):
            raise ConfigError(f"event_hooks[{kind!r}] must be a list of callables")
        items = tuple(funcs)
        for func in items:
            if not callable(func):
                raise ConfigError(f"event_hooks[{kind!r}] holds {func!r}, which is not callable")
        if items:
            resolved[kind] = items
    return resolved


class CallHooks:
    """The subscribers of one logical call, and the one place events are emitted."""

    __slots__ = ("attempt", "failure", "stream")

    def __init__(
        self,
        attempt: Sequence[AttemptHook],
        failure: Sequence[AttemptHook],
        *,
        stream: bool,
    ) -> None:
        self.attempt = attempt
        self.failure = failure
        self.stream = stream

    def emit(
        self,
        attempt: int,
        status: int | None,
        error: ModalLLMError | None,
        *,
        elapsed: float,
        wait: float | None = None,
        retry_after: bool = False,
    ) -> None:
        event = AttemptEvent(
            attempt=attempt,
            status=status,
            error=error,
            will_retry=wait is not None,
            wait=wait,
            retry_after=retry_after,
            elapsed=elapsed,
            stream=self.stream,
        )
        for hook in self.attempt:
            _run(hook, event)
        if error is not None:
            for hook in self.failure:
                _run(hook, event)


def _run(hook: AttemptHook, event: AttemptEvent) -> None:
    try:
        hook(event)
    except Exception:  # an observer must never break the call it observes
        log.exception("event hook %r raised; ignored", hook)
