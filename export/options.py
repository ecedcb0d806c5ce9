"""What an export can be asked for, validated before any work: :class:`ExportOptions`.

Torch-free, so ``gptkit export --help`` shows these defaults and choices without importing the
exporter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ExportError
from runtime.onnx_contract import KV_CACHE_MODES, KV_CONCAT, KV_INPLACE

DEFAULT_OPSET = 18  # the dynamo exporter's own opset (lower ones it down-converts, not always well)
SUPPORTED_OPSETS = range(18, 21)  # 20: the newest that gptkit's oldest ONNX Runtime (1.17) loads
DTYPES = ("fp32", "fp16")
QUANTIZATIONS = ("int8", "int4")
KV_CACHE_DTYPES = ("int8",)  # a quantized cache; by default the cache has the activations' dtype


@dataclass
class ExportOptions:
    """How to export: opset, weight dtype, int8/int4 quantisation, fusions and the KV-cache kind."""

    opset: int = DEFAULT_OPSET
    dtype: str = "fp32"  # fp16 halves the file and the KV cache (for GPUs)
    quantize: str | None = None  # "int8": dynamic int8 MatMul weights; "int4": 4-bit blocks (CPU)
    optimize: bool = False  # save ONNX Runtime's transformer fusions into the file
    kv_cache: str = KV_CONCAT  # or KV_INPLACE: ONNX Runtime's GroupQueryAttention, in place
    kv_cache_dtype: str | None = None  # "int8": the in-place cache in int8 (per-channel scales)
    kv_calibration: str | None = None  # a UTF-8 text to calibrate that cache on (else self-sampled)

    @property
    def variant(self) -> str:
        """The name parity tolerances are keyed by: fp32, fp16, int8 or int4 (the weights)."""
        return self.quantize or self.dtype

    def validate(self) -> None:
        """Reject unsupported values and combinations before any work is done."""
        if isinstance(self.opset, bool) or self.opset not in SUPPORTED_OPSETS:
            raise ExportError(
                f"opset {self.opset} is not supported; use one of "
                f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})"
            )
        if self.dtype not in DTYPES:
            raise ExportError(f"unknown dtype {self.dtype!r}; choose {' or '.join(DTYPES)}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            choices = " or ".join(QUANTIZATIONS)
            raise ExportError(f"unknown quantization {self.quantize!r}; choose {choices}")
        if self.kv_cache not in KV_CACHE_MODES:
            choices = " or ".join(KV_CACHE_MODES)
            raise ExportError(f"unknown KV cache {self.kv_cache!r}; choose {choices}")
        if self.kv_cache_dtype is not None:
            self._validate_kv_cache_dtype()
        if self.kv_calibration is not None:
            self._validate_kv_calibration()
        if self.dtype == "fp16" and self.quantize:
            raise ExportError(
                f"--dtype fp16 and --quantize {self.quantize} cannot be combined; "
                f"{self.quantize} keeps fp32 activations, so pick one"
            )

    def _validate_kv_calibration(self) -> None:
        path = Path(self.kv_calibration or "")
        if self.kv_cache_dtype is None:
            raise ExportError(
                "--kv-calibration calibrates a quantized KV cache; add --kv-cache-dtype int8"
            )
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "not found"
            raise ExportError(f"calibration text {path} {what}; pass a UTF-8 text file")
        if path.stat().st_size == 0:
            raise ExportError(f"calibration text {path} is empty; pass a UTF-8 text file")

    def _validate_kv_cache_dtype(self) -> None:
        from runtime.session import KV_QUANT_MIN_ORT, ort_supports_kv_quant

        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            choices = " or ".join(KV_CACHE_DTYPES)
            raise ExportError(f"unknown KV-cache dtype {self.kv_cache_dtype!r}; choose {choices}")
        if self.kv_cache != KV_INPLACE:
            raise ExportError(
                f"--kv-cache-dtype {self.kv_cache_dtype} needs --kv-cache inplace (ONNX Runtime's "
                "GroupQueryAttention reads the quantized cache); add it"
            )
        if self.dtype == "fp16":
            raise ExportError(
                f"--kv-cache-dtype {self.kv_cache_dtype} is for CPUs (fp32 activations); "
                "--dtype fp16 already halves the cache, so pick one"
            )
        import onnxruntime

        if not ort_supports_kv_quant(onnxruntime.__version__):
            need = ".".join(map(str, KV_QUANT_MIN_ORT))
            raise ExportError(
                f"--kv-cache-dtype {self.kv_cache_dtype} needs onnxruntime >= {need} (this is "
                f"{onnxruntime.__version__}); pip install -U onnxruntime"
            )
