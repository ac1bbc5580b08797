"""``modal-llm serve``: the reference endpoint's own command line, unchanged."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["serve"]


def serve(argv: Sequence[str]) -> int:
    """Run ``python -m modal_llm.server`` with ``argv``; return its exit status."""
    from ..server import main as serve_main

    return serve_main(list(argv))
