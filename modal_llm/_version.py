"""The package's version, written once: hatch reads it for the build, ``__version__`` and the
User-Agent read it at run time (no distribution metadata to load or scan)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
