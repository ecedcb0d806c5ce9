"""PyTorch to ONNX: the cached-decoder export, its variants, and parity verification.

    from export import ExportOptions, export_onnx
    result = export_onnx(model, tokenizer, "model.onnx", options=ExportOptions(quantize="int8"))
    print("\n".join(result.parity.lines()))

Names load lazily, so ``export.options`` (what the CLI's ``--help`` reads) imports without
PyTorch or ONNX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.lazy import lazy_attributes

if TYPE_CHECKING:  # pragma: no cover
    from export.onnx_export import ExportResult, export_onnx
    from export.options import ExportOptions
    from export.parity import ParityReport, verify_parity

__all__ = ["ExportOptions", "ExportResult", "ParityReport", "export_onnx", "verify_parity"]

_LAZY = {
    "ExportOptions": "export.options",
    "ExportResult": "export.onnx_export",
    "export_onnx": "export.onnx_export",
    "ParityReport": "export.parity",
    "verify_parity": "export.parity",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
