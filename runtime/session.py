"""One ONNX Runtime session over a gptkit export, and a KV cache that stays inside ONNX Runtime.

Each decode step binds the previous step's ``present.*`` outputs (OrtValues) directly as the next
step's ``past_key_values.*`` inputs through IO binding, so the cache is never copied into numpy
arrays between steps; on CUDA it stays on the GPU. Only the logits come back to numpy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.errors import ConfigError, ModelFileError
from runtime.metadata import ModelMetadata

DEVICES = ("cpu", "cuda")
OPTIMIZATION_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class StepOutput:
    logits: np.ndarray  # (B, T, V) float32
    presents: list  # OrtValues, fed back as the next step's past


class OnnxSession:
    """An InferenceSession plus what the metadata says about the model. Safe to share across threads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        threads: int | None = None,
        optimization: str = "all",
        allow_fallback: bool = False,
    ) -> None:
        path = Path(path)
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r}; choose cpu or cuda")
        if optimization not in OPTIMIZATION_LEVELS:
            raise ConfigError(
                f"unknown optimization level {optimization!r}; choose {', '.join(OPTIMIZATION_LEVELS)}"
            )
        if threads is not None and threads <= 0:
            raise ConfigError(f"threads must be positive, got {threads}")
        if not path.exists():
            raise ModelFileError(
                f"model file {path} not found; export one with `gptkit export {path}`"
            )
        if not path.is_file():
            raise ModelFileError(f"{path} is not a file; pass the path of an exported .onnx model")
        if path.stat().st_size == 0:
            raise ModelFileError(f"{path} is empty (0 bytes); re-export it with `gptkit export`")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                if not allow_fallback:
                    raise ConfigError(
                        "device cuda needs onnxruntime-gpu (this onnxruntime has no CUDA provider); "
                        "install it with: pip uninstall onnxruntime && pip install onnxruntime-gpu"
                    )
            else:
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; warnings about unused initializers are noise
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise ModelFileError(f"{path} is not a readable ONNX model ({reason})") from None
        self.path = path
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ModelMetadata.from_props(props, source=str(path))
        self._check_io()
        past_type = self.session.get_inputs()[self._input_index["past_key_values.0.key"]].type
        self.kv_dtype = np.float16 if "float16" in past_type else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.present_names = self.output_names[1:]
        self.past_names = [n.replace("present", "past_key_values", 1) for n in self.present_names]

    def _check_io(self) -> None:
        names = [i.name for i in self.session.get_inputs()]
        self._input_index = {n: i for i, n in enumerate(names)}
        n_layer = self.metadata.n_layer
        expected = {"input_ids", "attention_mask", "position_ids"} | {
            f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")
        }
        missing = expected - set(names)
        outputs = [o.name for o in self.session.get_outputs()]
        if missing or not outputs or outputs[0] != "logits":
            raise ModelFileError(
                f"{self.path} does not have gptkit's inputs and outputs "
                f"(missing {sorted(missing)[:3]}); re-export it with `gptkit export`"
            )

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Zero-length past tensors for the prompt step."""
        m = self.metadata
        shape = (batch, m.n_head, 0, m.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list,
    ) -> StepOutput:
        """Run one forward; ``past`` holds numpy arrays (first step) or the last step's OrtValues."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(
            "attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64)
        )
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return StepOutput(logits=outputs[0].numpy(), presents=list(outputs[1:]))
