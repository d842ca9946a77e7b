"""Lazy package APIs: ``from cifarlab.batchnorm import run_study`` loads the study's module on
first use, so importing a course part (e.g. for its report section) stays light and never
pulls in the training code."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, table: dict[str, str]):
    """A module ``__getattr__`` that resolves ``name`` from ``table[name]`` (a module path)."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(table[name]), name)

    return __getattr__
