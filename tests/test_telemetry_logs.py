"""``MODAL_LLM_LOG=info|debug`` turns on the package's logging, like ``OPENAI_LOG``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = (
    "import logging, modal_llm; log = logging.getLogger('modal_llm'); "
    "log.debug('debug line'); log.info('info line'); log.warning('warning line')"
)


def run(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MODAL_LLM_LOG"}
    if value is not None:
        env["MODAL_LLM_LOG"] = value
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True, env=env
    )
    return out.stderr


def test_debug_shows_everything_with_the_logger_name_and_level() -> None:
    err = run("debug")
    assert "debug line" in err
    assert "info line" in err
    assert "modal_llm:1 - DEBUG] debug line" in err


@pytest.mark.parametrize("value", ["info", "INFO", " info "])
def test_info_hides_debug(value: str) -> None:
    err = run(value)
    assert "info line" in err
    assert "debug line" not in err


@pytest.mark.parametrize("value", [None, "", "verbose", "0"])
def test_unset_or_unknown_leaves_logging_alone(value: str | None) -> None:
    err = run(value)
    # Python's last-resort handler prints bare warnings; nothing is configured by us.
    assert err.strip() == "warning line"
