"""``LazyModule``: a module bound to a name now and imported on first attribute access.

Public signatures name types whose modules ``import modal_llm`` leaves for later
(``Completion`` needs pydantic, ``TextStream`` the stream machinery) or that come from an
optional extra (OpenTelemetry, Ray). Their annotations are strings such as
``"_models.Completion"``. ``typing.get_type_hints`` (pydantic's ``validate_call``, typer,
FastAPI...) evaluates them in the module's globals, where ``_models`` is a ``LazyModule``:
resolving the hint imports the module then, and importing ``modal_llm`` does not. For
type checkers the same name is the real module (imported under ``TYPE_CHECKING``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["LazyModule"]


class LazyModule:
    """Stands for module ``name``; an attribute lookup imports it and reads the attribute.

    ``optional``: the module belongs to an extra that may be missing; its names then
    resolve to ``typing.Any`` (nobody can pass such an object without the extra).
    """

    __slots__ = ("_name", "_optional")

    def __init__(self, name: str, *, optional: bool = False) -> None:
        self._name = name
        self._optional = optional

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # copy, pickle, inspect probing: never an import
            raise AttributeError(attr)
        try:
            module = import_module(self._name)
        except ImportError:
            if not self._optional:
                raise
            return Any
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
