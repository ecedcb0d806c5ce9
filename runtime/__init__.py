"""gptkit's runtime: run an exported gptkit .onnx file with numpy, onnxruntime and tiktoken only.

Public API::

    import runtime
    model = runtime.load("model.onnx")
    print(model.generate("ROMEO:", max_new_tokens=50))

This package never imports PyTorch. Heavy names load lazily, so importing ``runtime.errors`` (as the
CLI does to print errors) costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime.errors import GptkitError

if TYPE_CHECKING:  # pragma: no cover
    from runtime.tokenizer import Tokenizer

__all__ = ["GptkitError", "Tokenizer"]

_LAZY = {
    "Tokenizer": "runtime.tokenizer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
