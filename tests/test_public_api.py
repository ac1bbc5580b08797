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


PUBLIC_PACKAGES = (
    "modal_llm",
    "modal_llm.testing",
    "modal_llm.langchain",
    "modal_llm.ray",
    "modal_llm.server",
    "modal_llm.cli",
)


def _public_callables() -> list[tuple[str, object]]:
    """Every public class, function and method (ours: defined in modal_llm) of the API."""
    import importlib
    import inspect

    found: list[tuple[str, object]] = []
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            where = f"{package}.{name}"
            if inspect.isfunction(obj):
                found.append((where, obj))
            if not inspect.isclass(obj):
                continue  # constants, type aliases, submodules
            found.append((where, obj))
            for klass in obj.__mro__:
                if not klass.__module__.startswith("modal_llm"):
                    continue
                for attr, value in vars(klass).items():
                    if attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__")):
                        continue
                    if isinstance(value, (classmethod, staticmethod)):
                        value = value.__func__
                    elif isinstance(value, property):
                        value = value.fget
                    # Only our own functions: pydantic attaches its own model_post_init.
                    if inspect.isfunction(value) and value.__module__.startswith("modal_llm"):
                        found.append((f"{where}.{attr}", value))
    return found


def test_every_public_hint_resolves_at_run_time() -> None:
    """``typing.get_type_hints`` (pydantic's validate_call, typer, FastAPI) works on the API.

    A name a signature uses must be bound in its module at run time: one imported only
    under ``TYPE_CHECKING`` is a NameError here. What ``import modal_llm`` leaves for later
    is named through a ``LazyModule`` (``_lazy.py``).
    """
    import inspect
    import typing

    def our_classes(hint: object) -> list[tuple[str, object]]:
        """The modal_llm classes a hint names (``Unpack[ClientSettings]``, ...)."""
        found = []
        if inspect.isclass(hint) and hint.__module__.startswith("modal_llm"):
            found.append((f"{hint.__module__}.{hint.__qualname__}", hint))
        for arg in typing.get_args(hint):
            found += our_classes(arg)
        return found

    failures = []
    todo = _public_callables()
    seen: set[int] = set()
    while todo:  # and every class of ours a resolved hint names (a TypedDict's fields...)
        where, obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        try:
            hints = typing.get_type_hints(obj, include_extras=True)
        except Exception as exc:
            failures.append(f"{where}: {type(exc).__name__}: {exc}")
            continue
        for hint in hints.values():
            todo += our_classes(hint)
    assert failures == []
    assert len(seen) > 250, len(seen)


def test_hints_resolve_from_a_fresh_import_and_load_deferred_modules_only_then() -> None:
    code = (
        "import sys, typing, modal_llm; "
        "from modal_llm import AsyncClient, ClientOptions; "
        "before = [m for m in ('modal_llm._models', 'modal_llm._streaming') if m in sys.modules]; "
        "hints = typing.get_type_hints(AsyncClient.stream); "
        "reply = typing.get_type_hints(AsyncClient.complete)['return']; "
        "typing.get_type_hints(ClientOptions); "
        "print(before, hints['return'].__name__, reply.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "TextStream", "Completion"]


def test_a_lazy_module_of_an_optional_extra_that_is_missing_resolves_to_any() -> None:
    import typing

    from modal_llm._lazy import LazyModule

    missing = LazyModule("modal_llm_no_such_extra", optional=True)
    assert missing.Provider is typing.Any
    with pytest.raises(ModuleNotFoundError):
        LazyModule("modal_llm_no_such_extra").Provider  # noqa: B018
    with pytest.raises(AttributeError):
        LazyModule("json")._private  # noqa: B018
    assert LazyModule("json").dumps([]) == "[]"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("uvloop", [False, True])
def test_ctrl_c_cancels_the_main_task_then_raises_keyboard_interrupt(uvloop: bool) -> None:
    """``run()``: Ctrl-C unwinds the program as a cancellation, on every Python.

    Python 3.11's ``asyncio.run`` does this itself; 3.10's raised ``KeyboardInterrupt``
    wherever the loop was (in aiohttp's ``data_received``, say), so no ``except
    CancelledError`` or orderly ``finally`` of the program ran.
    """
    code = (
        "import asyncio, os, signal, modal_llm\n"
        "async def main():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        await asyncio.sleep(30)\n"
        "    except asyncio.CancelledError:\n"
        "        print('cancelled')\n"
        "        raise\n"
        "    except KeyboardInterrupt:\n"
        "        print('KeyboardInterrupt inside')\n"
        "        raise\n"
        "try:\n"
        f"    modal_llm.run(main(), uvloop={uvloop})\n"
        "except KeyboardInterrupt:\n"
        "    print('KeyboardInterrupt')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split("\n") == ["cancelled", "KeyboardInterrupt", ""], out
