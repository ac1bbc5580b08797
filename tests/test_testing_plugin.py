"""The pytest plugin, run the way users run it: pytest in a subprocess on generated files.

Each run is one directory: docs/testing.md's complete example (its ``<!-- file: -->``
blocks, as written) and this module's own checks of the fixtures, under pytest-asyncio's
strict mode; the fixture checks again under auto mode. Warnings are errors (a leaked
socket is a ResourceWarning).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "testing.md"
BLOCK = re.compile(r"<!-- file: (\S+) -->\n```python\n(.*?)```", re.DOTALL)

INI = """\
[pytest]
asyncio_mode = {mode}
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error
    ignore::DeprecationWarning:langchain_community.*
    ignore::PendingDeprecationWarning
"""

CONFTEST = 'pytest_plugins = ["modal_llm.testing"]\n'

FIXTURE_CHECKS = """
import os
import socket
import threading

import pytest

from modal_llm import AsyncClient, Client
from modal_llm.server import toy_generate

THREADS = threading.active_count()
seen = {}


def refused(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_sync_fixture_sets_the_url(modal_endpoint):
    assert os.environ["MODAL_LLM_ENDPOINT_URL"] == modal_endpoint.url
    with Client() as client:
        assert client.generate("a b") == toy_generate("a b")
    seen["port"] = modal_endpoint.port


def test_then_the_endpoint_is_gone_and_the_url_unset():
    assert refused(seen["port"])
    assert "MODAL_LLM_ENDPOINT_URL" not in os.environ
    assert threading.active_count() == THREADS


@pytest.mark.asyncio
async def test_async_test_with_the_fixture(modal_endpoint):
    async with AsyncClient() as client:
        assert await client.generate("x") == toy_generate("x")
    await modal_endpoint.wait_for_async(lambda s: s.posts == 1)


@pytest.mark.asyncio
async def test_factory_in_an_async_test(modal_endpoint_factory):
    one = modal_endpoint_factory(script=["one"])
    two = modal_endpoint_factory(rate_limit_every=1, retry_after=None)
    async with AsyncClient(one.url) as client:
        assert await client.generate("x") == "one"
    assert "MODAL_LLM_ENDPOINT_URL" not in os.environ
    seen["ports"] = (one.port, two.port)


def test_then_the_factory_endpoints_are_gone():
    assert all(refused(port) for port in seen["ports"])
    assert threading.active_count() == THREADS
"""


def start_pytest(directory: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_LLM_", "PYTEST_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def docs_files() -> dict[str, str]:
    files: dict[str, list[str]] = {}
    for name, code in BLOCK.findall(DOCS.read_text(encoding="utf-8")):
        files.setdefault(name, []).append(code)
    return {name: "\n\n".join(parts) for name, parts in files.items()}


def test_docs_example_has_the_promised_parts() -> None:
    files = docs_files()
    assert set(files) == {"conftest.py", "myapp.py", "test_myapp.py"}
    assert files["conftest.py"].strip() == CONFTEST.strip()
    for uses in ("AsyncClient", "Client()", "Modal()", "FastAPI"):
        assert uses in files["myapp.py"]


def test_docs_example_and_fixtures_pass_in_auto_and_strict_mode(tmp_path: Path) -> None:
    """Strict mode runs the docs' example and the fixture checks; auto mode, where marks
    are optional, the fixture checks (sync and async tests alike)."""
    runs = {}
    for mode, files, expected in (
        ("strict", {**docs_files(), "test_fixtures.py": FIXTURE_CHECKS}, 12),
        ("auto", {"conftest.py": CONFTEST, "test_fixtures.py": FIXTURE_CHECKS}, 5),
    ):
        directory = tmp_path / mode
        directory.mkdir()
        for name, code in files.items():
            (directory / name).write_text(textwrap.dedent(code), encoding="utf-8")
        (directory / "pytest.ini").write_text(INI.format(mode=mode), encoding="utf-8")
        runs[mode] = (start_pytest(directory), expected)  # both at once
    for mode, (process, expected) in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{mode} mode:\n{output}"
        assert re.search(rf"\b{expected} passed\b", output), f"{mode} mode:\n{output}"
        assert "skipped" not in output and "warning" not in output, f"{mode} mode:\n{output}"


def test_plugin_is_not_loaded_by_itself() -> None:
    """No pytest11 entry point: only ``pytest_plugins = ["modal_llm.testing"]`` loads it."""
    plugins = importlib.metadata.entry_points(group="pytest11")
    assert not [ep for ep in plugins if ep.value.startswith("modal_llm")]
    assert "pytest11" not in (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
