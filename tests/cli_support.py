"""Running the installed ``modal-llm`` script in a subprocess, as a user does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MODAL_LLM = Path(sys.executable).with_name("modal-llm")
"""The console script of this environment: the real entry point."""


def cli_env(**extra: str) -> dict[str, str]:
    """The environment without any MODAL_LLM_* setting of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_LLM_")}
    return {**env, "PYTHONIOENCODING": "utf-8", **extra}


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def one_line_error(self, *needles: str, prefix: str = "modal-llm: error: ") -> str:
        """The single stderr line (asserted), which holds every needle."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith(prefix), self.err
        assert "Traceback" not in self.err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        return lines[0]


async def modal_llm(
    *argv: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> Ran:
    """Run ``modal-llm argv...`` while the caller's loop keeps serving its endpoints."""
    proc = await asyncio.create_subprocess_exec(
        str(MODAL_LLM),
        *argv,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(**(env or {})),
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode("utf-8"), err.decode("utf-8"))


async def start(*argv: str, **kwargs: object) -> asyncio.subprocess.Process:
    """Start ``modal-llm argv...`` with pipes, for tests that signal it."""
    return await asyncio.create_subprocess_exec(
        str(MODAL_LLM),
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        **kwargs,  # type: ignore[arg-type]
    )


async def finish(proc: asyncio.subprocess.Process, sig: int | None = None) -> Ran:
    """Optionally send ``sig``, then collect the exit status and the rest of the output."""
    if sig is not None:
        proc.send_signal(sig)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode("utf-8"), err.decode("utf-8"))


__all__ = ["MODAL_LLM", "Ran", "cli_env", "finish", "modal_llm", "signal", "start"]
