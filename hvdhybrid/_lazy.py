"""Lazy package exports: a folder's ``__init__`` names what it exports; modules load on first use."""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["exports"]


def exports(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``names[attr]`` (a submodule) on first use.

    Keeps ``import hvdhybrid.<folder>`` light: nothing heavy (torch, MPI) loads until a name is used.
    """

    def getattr_(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr_
