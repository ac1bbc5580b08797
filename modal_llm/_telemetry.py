"""Whether a client records OpenTelemetry spans and metrics: decided once per client.

This module imports only the standard library, so ``import modal_llm`` never loads
OpenTelemetry. The instrumentation itself is in ``_otel`` (the ``otel`` extra), imported
only when there is something to record: a provider passed to the client, or a global one
configured by the application (which means the application imported OpenTelemetry
before the client opened its session). Otherwise the client keeps ``None`` and each
call pays one attribute check.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._otel import Instrumentation

__all__ = ["instrumentation_for"]


def instrumentation_for(
    endpoint_url: str,
    *,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    capture_content: bool = False,
) -> Instrumentation | None:
    """The client's ``Instrumentation``, or ``None`` when nothing would be recorded.

    ``None`` when no provider was passed and OpenTelemetry was never imported in this
    process, when the ``otel`` extra (``opentelemetry-api``) is not installed, or when
    neither signal has a real provider (the API's default proxies record nothing).
    """
    if (
        tracer_provider is None
        and meter_provider is None
        and "opentelemetry.trace" not in sys.modules
        and "opentelemetry.metrics" not in sys.modules
    ):
        return None
    try:
        from ._otel import Instrumentation
    except ImportError:  # the otel extra is not installed
        return None
    try:
        return Instrumentation.build(
            endpoint_url,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            capture_content=capture_content,
        )
    except Exception:  # an SDK too old or broken: the client works, unobserved
        logging.getLogger("modal_llm").exception("OpenTelemetry instrumentation disabled")
        return None
