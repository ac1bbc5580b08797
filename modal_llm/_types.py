"""Type aliases shared across modal-llm (aliases only, no logic)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JSONObject = dict[str, Any]
"""A decoded JSON object: the request body or the endpoint's full reply."""

HeaderTypes = Mapping[str, str] | None
"""Extra HTTP headers, per client or per call."""

StopTypes = str | list[str] | tuple[str, ...] | None
"""Stop sequences: one string, a list of strings, or none."""

__all__ = ["HeaderTypes", "JSONObject", "StopTypes"]
