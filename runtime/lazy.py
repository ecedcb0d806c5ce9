"""Lazy public names for a package's ``__init__``: a name's module is imported on first use.

So ``import runtime.errors`` (the CLI, to print errors) does not import onnxruntime, and
``import gpt_core.train_config`` or ``export.options`` (what ``--help`` reads) does not import
PyTorch, while ``from gpt_core import GPT`` still works.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` serving ``name`` from the module ``table[name]``."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
