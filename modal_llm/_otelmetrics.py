"""OpenTelemetry metric instruments of modal-llm, shared per meter provider (``otel`` extra).

``gen_ai.client.operation.duration``, ``gen_ai.client.operation.time_to_first_chunk``,
``modal_llm.client.retries``, ``modal_llm.client.active_requests`` (per-client counts read
at collection) and ``modal_llm.client.concurrency.limit`` (adaptive map limits). Recorded
by ``_otel.Instrumentation``; imported only through it.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

__all__ = [
    "DURATION_BUCKETS",
    "SCOPE_NAME",
    "ActiveCount",
    "Instruments",
    "LimitLike",
    "instruments_for",
    "real_meter_provider",
    "scope_version",
]

SCOPE_NAME: Final = "modal_llm"
"""The instrumentation scope of modal-llm's tracer and meter."""

DURATION_BUCKETS: Final = (
    *(0.01 * 2**i for i in range(14)),  # 0.01 .. 81.92 s: the GenAI semantic conventions' advice
    163.84,
    327.68,
    655.36,  # cold starts and 303 result-URL chains run for minutes on Modal
)


class LimitLike(Protocol):
    """What the concurrency-limit gauge reads: ``AdaptiveConcurrency.limit``."""

    @property
    def limit(self) -> int: ...


def scope_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modal-llm")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+unknown"


def real_meter_provider(given: MeterProvider | None) -> MeterProvider | None:
    """``given``, else the global provider; None when neither records anything."""
    provider = given if given is not None else metrics.get_meter_provider()
    # ``_ProxyMeterProvider`` is what ``get_meter_provider()`` returns before one is set.
    if isinstance(provider, metrics.NoOpMeterProvider) or type(provider).__name__.startswith(
        "_Proxy"
    ):
        return None
    return provider


class Instruments:
    """The metric instruments of one meter provider, shared by every client using it.

    Shared because a meter provider hands back the instrument registered first under a
    name, and would drop a second client's gauge callback.
    """

    def __init__(self, meter: Meter) -> None:
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of a modal-llm call: all attempts, backoff and 303 hops",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time from the start of a streamed call to its first piece of text",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.retries = meter.create_counter(
            "modal_llm.client.retries",
            unit="{retry}",
            description="Attempts that failed and were retried, by status or error type",
        )
        # Calls in flight are plain ints read at collection time: an UpDownCounter would
        # cost two SDK measurements per call for what a reader samples every few seconds.
        # One count per client (changed only on its loop's thread), summed per endpoint.
        self._lock = threading.Lock()  # registration only; the reader takes snapshots
        self._active: dict[int, weakref.ref[ActiveCount]] = {}
        meter.create_observable_up_down_counter(
            "modal_llm.client.active_requests",
            callbacks=[self._observe_active],
            unit="{request}",
            description="Logical calls in flight (waiting for a slot, sending, backing off)",
        )
        self._limits: dict[int, tuple[LimitLike, Mapping[str, Any]]] = {}
        self._keys = itertools.count()
        meter.create_observable_gauge(
            "modal_llm.client.concurrency.limit",
            callbacks=[self._observe_limits],
            unit="{request}",
            description="Adaptive concurrency limit of the running map() calls (summed)",
        )

    def active_for(self, attributes: Mapping[str, Any]) -> ActiveCount:
        """A new in-flight count for one client; reported while the client lives."""
        active = ActiveCount(attributes)
        with self._lock:
            self._active[next(self._keys)] = weakref.ref(active)
        return active

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            refs = list(self._active.items())
        totals: dict[tuple[Any, ...], tuple[int, Mapping[str, Any]]] = {}
        for key, ref in refs:
            active = ref()
            if active is None:  # its client is gone
                with self._lock:
                    self._active.pop(key, None)
                continue
            total, _ = totals.get(active.group, (0, active.attributes))
            totals[active.group] = (total + active.count, active.attributes)
        return [Observation(total, dict(attributes)) for total, attributes in totals.values()]

    def track(self, limiter: LimitLike, attributes: Mapping[str, Any]) -> Callable[[], None]:
        key = next(self._keys)
        with self._lock:
            self._limits[key] = (limiter, attributes)

        def untrack() -> None:
            with self._lock:
                self._limits.pop(key, None)

        return untrack

    def _observe_limits(self, options: CallbackOptions) -> Iterable[Observation]:
        # Runs on the metric reader's thread: read a snapshot, never the live dict.
        totals: dict[tuple[Any, ...], tuple[int, Mapping[str, Any]]] = {}
        seen: set[tuple[int, tuple[Any, ...]]] = set()
        with self._lock:
            tracked = list(self._limits.values())
        for limiter, attributes in tracked:
            group = tuple(sorted(attributes.items()))
            if (id(limiter), group) in seen:  # one limiter shared by two maps counts once
                continue
            seen.add((id(limiter), group))
            total, _ = totals.get(group, (0, attributes))
            totals[group] = (total + limiter.limit, attributes)
        return [Observation(total, dict(attributes)) for total, attributes in totals.values()]


class ActiveCount:
    """One client's calls in flight; changed on its loop, read by the metric reader."""

    __slots__ = ("__weakref__", "attributes", "count", "group")

    def __init__(self, attributes: Mapping[str, Any]) -> None:
        self.attributes = dict(attributes)
        self.group = tuple(sorted(self.attributes.items()))
        self.count = 0


_SHARED: weakref.WeakKeyDictionary[MeterProvider, Instruments] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def instruments_for(provider: MeterProvider) -> Instruments:
    """The instruments of ``provider``, made once and shared by the clients using it."""
    with _SHARED_LOCK:
        try:
            found = _SHARED.get(provider)
        except TypeError:  # a provider that cannot be weakly referenced: not shared
            return Instruments(provider.get_meter(SCOPE_NAME, scope_version()))
        if found is None:
            found = Instruments(provider.get_meter(SCOPE_NAME, scope_version()))
            _SHARED[provider] = found
        return found
