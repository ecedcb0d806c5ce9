"""PyTorch to ONNX: the cached-decoder export, its variants, and parity verification."""

from export.onnx_export import ExportOptions, ExportResult, export_onnx
from export.parity import ParityReport, verify_parity

__all__ = ["ExportOptions", "ExportResult", "ParityReport", "export_onnx", "verify_parity"]
