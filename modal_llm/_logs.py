"""``MODAL_LLM_LOG=info|debug``: turn on the package's logging from the environment.

The same switch as openai-python's ``OPENAI_LOG`` (``_utils/_logs.py``): when set, the
root logger gets ``logging.basicConfig`` (which does nothing if the application already
configured logging) and the ``modal_llm`` logger gets the level. Unset or any other value
leaves logging alone, so a library import has no side effect by default.
"""

from __future__ import annotations

import logging
import os
from typing import Final

__all__ = ["ENV_LOG", "setup_logging"]

ENV_LOG: Final = "MODAL_LLM_LOG"
_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO}


def setup_logging() -> None:
    """Apply ``MODAL_LLM_LOG`` (``info`` or ``debug``, any case); called on import."""
    level = _LEVELS.get(os.environ.get(ENV_LOG, "").strip().lower())
    if level is None:
        return
    # e.g. [2026-11-30 04:40:12 - modal_llm:131 - INFO] retrying after attempt 1 failed (429) ...
    logging.basicConfig(
        format="[%(asctime)s - %(name)s:%(lineno)d - %(levelname)s] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    logging.getLogger("modal_llm").setLevel(level)
