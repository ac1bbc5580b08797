"""The reference endpoint in a process of its own: for code under test in other processes.

Ray workers, benchmarks and anything that should not share the test's GIL reach it over
loopback like any endpoint. ``python -m modal_llm.server --port 0`` prints its URL as its
first line once it listens; that line is the handshake.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Final

__all__ = ["STOP_TIMEOUT", "endpoint_process"]

STOP_TIMEOUT: Final = 10.0
"""Seconds the process gets to exit after SIGTERM before it is killed."""


@contextlib.contextmanager
def endpoint_process(*flags: str) -> Iterator[str]:
    """Run the reference endpoint in a subprocess on a free loopback port; yield its URL.

    ``flags`` are those of ``python -m modal_llm.server`` (``"--latency", "0.05"``,
    ``"--failure-rate", "0.1"``, ...). The process is stopped (SIGTERM, then SIGKILL after
    ``STOP_TIMEOUT`` seconds) when the block ends. Raises ``RuntimeError`` when it does not
    start (a bad flag, say); the server's own message is on stderr.

    Usage::

        with endpoint_process("--latency", "0.01") as url:
            ...  # AsyncClient(url), a Ray job, a benchmark
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "modal_llm.server", "--port", "0", *flags],
        stdout=subprocess.PIPE,  # its stderr stays ours: it may log for as long as it runs
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            status = proc.wait(STOP_TIMEOUT)
            raise RuntimeError(
                f"the reference endpoint did not start (exit status {status}; its error is "
                "on stderr above)"
            )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
