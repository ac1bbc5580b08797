"""Retry decisions, backoff and the one retry driver. The only module that imports tenacity.

The decisions (``is_retryable``, ``parse_retry_after``) are pure functions over our own
errors and headers. ``retry_call`` runs the retries with ``tenacity.AsyncRetrying`` and
hides it: callers see their own exception with ``.attempts`` set, never ``RetryError``.
``send_with_retries`` is the driver every request of the send path goes through (unary
requests, 303 polls, stream openings): it masks each attempt's error and emits its
``AttemptEvent``.

The first attempt runs outside tenacity; tenacity is only built once something failed, so
a request that succeeds costs nothing here. It is imported then too, not on ``import
modal_llm``: the wait and stop rules below are plain callables, as tenacity allows.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ._config import RetryPolicy
from ._exceptions import (
    ConnectError,
    EndpointTimeoutError,
    ModalLLMError,
    StatusError,
    mask_error,
)

if TYPE_CHECKING:
    from tenacity import RetryCallState

    from ._hooks import CallHooks

__all__ = ["is_retryable", "parse_retry_after", "retry_call", "retry_failed", "send_with_retries"]

log = logging.getLogger("modal_llm")

T = TypeVar("T")


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, then ``Retry-After`` in
    seconds or as an HTTP date. ``None`` when absent or unreadable."""
    ms = headers.get("retry-after-ms") or headers.get("Retry-After-Ms")
    if ms:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if value >= 0 and value == value:  # NaN is not a delay
            return value
    raw = headers.get("retry-after") or headers.get("Retry-After")
    if not raw:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return None
    return seconds


def is_retryable(error: BaseException, policy: RetryPolicy) -> bool:
    """Whether ``error`` is worth another attempt under ``policy``.

    Retried: connection failures before any reply, connect and first-byte timeouts (when
    ``retry_timeouts``), and statuses in ``retry_statuses`` whose Retry-After, if any, is
    within ``max_retry_after``. Never: other 4xx, contract breaks, stream errors after a
    piece reached the caller.
    """
    if isinstance(error, StatusError):
        if error.status_code not in policy.retry_statuses:
            return False
        return error.retry_after is None or error.retry_after <= policy.max_retry_after
    if isinstance(error, EndpointTimeoutError):
        return policy.retry_timeouts and error.phase in ("connect", "first_byte")
    if isinstance(error, ConnectError):
        return error.before_response
    return False


class _wait_backoff:
    """Exponential backoff with additive jitter, capped: see ``RetryPolicy``.

    Written here rather than ``tenacity.wait_exponential(...) + wait_random(...)``: tenacity
    9.2 deprecates ``wait_exponential``'s ``initial=`` (in favour of ``multiplier=``) inside
    our pinned range ``>=9.0,<10``, and pytest runs with ``filterwarnings=error``, so a
    user's test suite would fail on whichever spelling their tenacity does not like. Our
    own ten lines behave the same on every 9.x and keep the formula of ``RetryPolicy``.
    """

    def __init__(self, initial: float, maximum: float, jitter: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        exponent = min(retry_state.attempt_number - 1, 62)
        delay = self.initial * 2.0**exponent + random.uniform(0, self.jitter)
        return max(0.0, min(delay, self.maximum))


class _wait_retry_after:
    """Wait what the server asked for (Retry-After), else defer to the fallback backoff."""

    def __init__(self, fallback: _wait_backoff) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, StatusError) and error.retry_after is not None:
            return error.retry_after
        return self.fallback(retry_state)


class _stop_rule:
    """Stop after ``attempts`` attempts, or when the upcoming sleep would end past the
    deadline (a loop-clock time), if there is one."""

    def __init__(
        self, attempts: int, deadline_at: float | None, clock: Callable[[], float]
    ) -> None:
        self.attempts = attempts
        self.deadline_at = deadline_at
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        if retry_state.attempt_number >= self.attempts:
            return True
        deadline_at = self.deadline_at
        return deadline_at is not None and self.clock() + retry_state.upcoming_sleep >= deadline_at


def _log_retry(retry_state: RetryCallState) -> None:
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    status = getattr(error, "status_code", None)
    log.info(
        "retrying after attempt %d failed (%s): sleeping %.2fs; %s",
        retry_state.attempt_number,
        status if status is not None else type(error).__name__,
        retry_state.upcoming_sleep,
        error,
    )


async def retry_call(
    attempt: Callable[[int], Awaitable[T]],
    first_error: ModalLLMError,
    policy: RetryPolicy,
    *,
    deadline_at: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Continue a call whose first attempt failed with ``first_error``.

    ``attempt(n)`` performs attempt number ``n`` (2, 3, ...). The first attempt's error is
    replayed into tenacity so that attempt numbering, backoff and the stop rule see it. The
    final error is re-raised with ``.attempts`` set. ``on_retry(error, wait)`` runs once a
    failed attempt is to be retried, before the sleep of ``wait`` seconds.
    """
    import tenacity  # only once an attempt failed: never on ``import modal_llm``

    def before_sleep(retry_state: RetryCallState) -> None:
        _log_retry(retry_state)
        outcome = retry_state.outcome
        if on_retry is not None and outcome is not None:
            error = outcome.exception()
            if error is not None:
                on_retry(error, retry_state.upcoming_sleep)

    retrying = tenacity.AsyncRetrying(
        stop=_stop_rule(policy.max_retries + 1, deadline_at, clock),
        wait=_wait_retry_after(_wait_backoff(policy.wait_initial, policy.wait_max, policy.jitter)),
        retry=tenacity.retry_if_exception(lambda e: is_retryable(e, policy)),
        before_sleep=before_sleep,
        reraise=True,
    )
    number = 0

    async def run() -> T:
        nonlocal number
        number += 1
        if number == 1:
            raise first_error
        return await attempt(number)

    try:
        return await retrying(run)
    except ModalLLMError as exc:
        exc.attempts = number
        raise


class _CallState(Protocol):
    """What the driver needs of a logical call (``_send.Call``)."""

    deadline_at: float | None
    hooks: CallHooks | None
    secrets: tuple[str, ...]
    sent: int


class _HasStatus(Protocol):
    status: int


R = TypeVar("R", bound=_HasStatus)


async def send_with_retries(
    send: Callable[[int], Awaitable[R]],
    call: _CallState,
    policy: RetryPolicy,
    clock: Callable[[], float],
) -> tuple[R, int]:
    """Run ``send(n)`` until it succeeds or the policy gives up; return it and its attempts.

    Every attempt's error is masked (``call.secrets``) before anyone sees it, and each
    outcome is emitted to ``call.hooks`` after the retry decision and before the sleep.
    The final error is raised with ``.attempts`` set.
    """
    hooks = call.hooks
    started = clock() if hooks is not None else 0.0
    try:
        result = await send(1)
    except ModalLLMError as exc:
        return await retry_failed(exc, send, call, policy, clock, started)
    if hooks is not None:
        hooks.emit(call.sent, result.status, None, elapsed=clock() - started)
    return result, 1


async def retry_failed(
    first_error: ModalLLMError,
    send: Callable[[int], Awaitable[R]],
    call: _CallState,
    policy: RetryPolicy,
    clock: Callable[[], float],
    started: float = 0.0,
) -> tuple[R, int]:
    """``send_with_retries`` once attempt 1 failed with ``first_error`` (which began at
    ``started``). A hot path without hooks makes its first attempt inline and calls this
    only on failure, so a request that succeeds costs nothing here."""
    hooks = call.hooks
    mask_error(first_error, call.secrets)
    if policy.max_retries == 0 or not is_retryable(first_error, policy):
        first_error.attempts = 1
        if hooks is not None:
            hooks.emit(call.sent, _status(first_error), first_error, elapsed=clock() - started)
        raise first_error
    attempts = 1

    def on_retry(error: BaseException, wait: float) -> None:
        if hooks is not None and isinstance(error, ModalLLMError):
            hint = getattr(error, "retry_after", None)
            hooks.emit(
                call.sent,
                _status(error),
                error,
                elapsed=clock() - started,
                wait=wait,
                retry_after=hint is not None and hint == wait,
            )

    async def attempt(number: int) -> R:
        nonlocal attempts, started
        attempts = number
        started = clock() if hooks is not None else 0.0
        try:
            result = await send(number)
        except ModalLLMError as exc:
            mask_error(exc, call.secrets)
            raise
        if hooks is not None:
            hooks.emit(call.sent, result.status, None, elapsed=clock() - started)
        return result

    try:
        result = await retry_call(
            attempt,
            first_error,
            policy,
            deadline_at=call.deadline_at,
            clock=clock,
            on_retry=on_retry if hooks is not None else None,
        )
    except ModalLLMError as exc:
        if hooks is not None:
            hooks.emit(call.sent, _status(exc), exc, elapsed=clock() - started)
        raise
    return result, attempts


def _status(error: BaseException) -> int | None:
    status: Any = getattr(error, "status_code", None)
    return status if isinstance(status, int) else None
