"""The public face: one sorted, complete ``__all__``; no heavy imports on ``import modal_llm``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import modal_llm


def test_all_is_sorted_and_complete() -> None:
    exported = modal_llm.__all__
    assert list(exported) == sorted(exported, key=lambda n: (not n.isupper(), n))
    public = {n for n in dir(modal_llm) if not n.startswith("_")}
    public -= {"annotations", "Any", "TYPE_CHECKING"}
    assert set(exported) <= public
    modules = {n for n in public if type(getattr(modal_llm, n)).__name__ == "module"}
    assert public - modules - {"server", "langchain"} <= set(exported)


def test_every_error_is_a_modal_llm_error() -> None:
    for name in modal_llm.__all__:
        obj = getattr(modal_llm, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, modal_llm.ModalLLMError), name


def test_version() -> None:
    assert isinstance(modal_llm.__version__, str)


def test_import_is_light() -> None:
    code = (
        "import sys, modal_llm; "
        "heavy = [m for m in ('langchain_core', 'tqdm', 'pyarrow', 'modal_llm.server', "
        "'modal_llm.cli', 'modal_llm.testing', 'pytest', 'opentelemetry', "
        "'opentelemetry.trace', 'modal_llm._otel', 'modal_llm._otelmetrics', 'modal_llm.ray', "
        "'modal_llm._raycolumns', 'ray') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_uses_the_default_loop_when_uvloop_is_refused() -> None:
    import asyncio

    async def loop_name() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert modal_llm.run(loop_name(), uvloop=False).startswith("asyncio")


LAZY_MODULES = (
    # Loaded by what needs them, never by ``import modal_llm`` (issue 17: import time).
    "pydantic",  # the first reply (Completion)
    "pydantic_core",  # the first client (request bodies)
    "tenacity",  # the first retry
    "modal_llm._models",
    "modal_llm._fanout",  # the first map()
    "modal_llm._progress",
    "modal_llm._streaming",  # the first stream()
    "modal_llm._sync",  # the first Client
    "modal_llm._portal",
)


def test_import_leaves_what_a_first_call_needs_for_later() -> None:
    code = (
        "import sys, modal_llm; "
        f"print([m for m in {LAZY_MODULES!r} if m in sys.modules]); "
        "print(sorted(n for n in modal_llm.__all__ if n not in vars(modal_llm)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, deferred = out.stdout.splitlines()
    assert loaded == "[]"
    assert deferred == "['Client', 'Completion', 'TextStream']"


def test_every_public_name_resolves_from_a_fresh_interpreter() -> None:
    code = (
        "import modal_llm; "
        "from modal_llm import *; "
        "names = modal_llm.__all__; "
        "assert all(globals()[n] is getattr(modal_llm, n) for n in names); "
        "assert set(names) <= set(dir(modal_llm)); "
        "print(sorted({getattr(modal_llm, n).__module__ for n in names "
        "if isinstance(getattr(modal_llm, n), type)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "modal_llm._sync" in out.stdout and "modal_llm._models" in out.stdout
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        modal_llm.Nope  # noqa: B018


def test_the_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert modal_llm.__version__ == version("modal-llm")
