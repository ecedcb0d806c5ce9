"""One ONNX Runtime session over a gptkit export, and a KV cache that stays inside ONNX Runtime.

A gptkit export is one graph for prefill and decode (:mod:`runtime.onnx_contract`): it takes
``input_ids`` [B, T], ``attention_mask`` [B, P+T], ``position_ids`` [B, T] and the past
``past_key_values.{i}.key|value`` [B, n_head, P, head_dim] (P = 0 on the first step), and returns
``logits`` [B, T, V] and ``present.{i}.key|value`` [B, n_head, P+T, head_dim].

The cache is never copied between steps. With IO binding (the default on CUDA) each step binds
the previous step's ``present.*`` outputs, OrtValues that stay on the GPU, directly as the next
step's ``past_key_values.*`` inputs; only the logits come back to the host. On the CPU the plain
``InferenceSession.run`` path is the default: its numpy outputs wrap ONNX Runtime's own buffers
(no copy), numpy inputs are wrapped the same way, and it makes fewer Python calls per step than
binding 1 + 4 * n_layer names.
``io_binding=True`` forces binding on the CPU too; both paths give identical tokens (tested).

Files exported with ``--kv-cache inplace`` (ONNX Runtime's GroupQueryAttention) get a third path:
one buffer of ``capacity`` positions per layer's key and value, bound as both the past input and
the present output, which the graph fills in place. A step then binds three small inputs and a
logits buffer and copies nothing else, so its cost no longer grows with a concatenated cache.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from runtime import graph_cache
from runtime.errors import ConfigError, GptkitError, ModelFileError
from runtime.metadata import ModelMetadata, read_props
from runtime.onnx_contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    KV_INPLACE,
    LOGITS,
    POSITION_IDS,
    input_names,
    output_names,
    past_names,
    present_names,
)

_T = TypeVar("_T")
DEVICES = ("cpu", "cuda")
OPTIMIZATION_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_KV_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,  # `--kv-cache-dtype int8`: scales inside the graph, CPU only
}
# ONNX Runtime 1.25-1.26 know GroupQueryAttention's quantization attributes, but their CPU kernel
# registers float caches only (the session loads, the first run fails with a type error).
KV_QUANT_MIN_ORT = (1, 27)
# What InferenceSession.run raises (Fail, InvalidArgument, RuntimeException, ...): its own types.
# run_with_iobinding raises a plain RuntimeError("Error in execution: ...") instead.
_ORT_ERRORS: tuple[type[Exception], ...] = (
    *(
        value
        for value in vars(ort.capi.onnxruntime_pybind11_state).values()
        if isinstance(value, type) and issubclass(value, Exception)
    ),
    RuntimeError,
)


@dataclass(frozen=True)
class KVCache:
    """The past for the next step: per layer a key and a value [B, n_head, length, head_dim].

    ``values`` are OrtValues (IO binding) or numpy arrays (plain runs, and the empty first past).
    A cache belongs to one generation call; it is never shared between threads.
    """

    values: tuple[Any, ...]
    length: int
    # In-place caches only: the IO binding whose past and present share ``values`` (on the CPU
    # numpy buffers [B, n_head, capacity, head_dim] wrapped by ``ort_values``; on CUDA the GPU
    # OrtValues themselves).
    binding: Any = None
    ort_values: tuple[Any, ...] = ()
    capacity: int = 0
    step: DecodeBuffers | None = None  # reused inputs/outputs of one-token steps


class DecodeBuffers:
    """Input ids, positions and logits of a one-token step for B rows, bound once per cache.

    Binding a numpy array makes a new OrtValue each time, a visible part of a small model's
    step, so decode steps write into these.
    """

    def __init__(self, batch: int, vocab_size: int) -> None:
        self.ids = np.zeros((batch, 1), dtype=np.int64)
        self.positions = np.zeros((batch, 1), dtype=np.int64)
        self.logits = np.zeros((batch, 1, vocab_size), dtype=np.float32)
        self.ids_value = ort.OrtValue.ortvalue_from_numpy(self.ids)
        self.positions_value = ort.OrtValue.ortvalue_from_numpy(self.positions)
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.bound = False


class OnnxSession:
    """An InferenceSession plus what the file's metadata says. Safe to share across threads.

    ``run`` keeps no state between calls (ONNX Runtime's ``Run`` is thread-safe and every call
    gets its own IO binding), so any number of threads can generate through one session.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        threads: int | None = None,
        optimization: str = "all",
        allow_fallback: bool = False,
        io_binding: bool | None = None,
        cache: bool = True,
    ) -> None:
        path = Path(path)
        _check_options(device, threads, optimization)
        _check_file(path)
        providers = _providers(device, allow_fallback)

        def make_options() -> ort.SessionOptions:
            options = ort.SessionOptions()
            options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only: unused-initializer warnings are noise
            return options

        def make_session() -> tuple[ort.InferenceSession, bool]:
            if cache and providers == ["CPUExecutionProvider"] and optimization == "all":
                if graph_cache.enabled(path):
                    session = graph_cache.open_session(path, make_options, providers)
                    if session is not None:
                        return session, True
            try:
                return ort.InferenceSession(str(path), make_options(), providers=providers), False
            except Exception as e:  # onnxruntime raises its own types for unreadable files
                reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                raise ModelFileError(
                    f"{path} is not a readable ONNX model ({reason or type(e).__name__})"
                ) from None

        # ONNX Runtime releases the GIL while it creates the session (for GPT-2 most of a
        # load), so the tokenizer is built from the file's metadata meanwhile.
        session_result = _in_background(make_session)
        metadata = _metadata_from_file(path)
        if metadata is not None and metadata.kv_dtype == "int8":
            _check_kv_quant(path, ort.__version__)
        session, self.cached = session_result()  # cached: through the optimised-graph cache
        self.session = session
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            if not allow_fallback:  # NB: ONNX Runtime itself falls back to CPU with only a warning
                raise ConfigError(
                    "device cuda: onnxruntime-gpu is installed but its CUDA provider failed to "
                    "load (check the CUDA and cuDNN libraries), or pass --device cpu"
                )
        self.path = path
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.metadata = metadata or ModelMetadata.from_props(
            self.session.get_modelmeta().custom_metadata_map, source=str(path)
        )
        # A shared past/present buffer needs IO binding; io_binding=False runs the same graph
        # with a concatenated cache instead (slower, used to cross-check the two).
        self.inplace = self.metadata.kv_cache == KV_INPLACE and io_binding is not False
        self.past_names, self.present_names = self._check_io()
        past_type = {i.name: i.type for i in self.session.get_inputs()}[self.past_names[0]]
        if past_type not in _KV_DTYPES:
            raise ModelFileError(f"{path}: unsupported KV-cache type {past_type}; re-export it")
        self.kv_dtype = _KV_DTYPES[past_type]
        if self.kv_dtype == np.int8:
            _check_kv_quant(path, ort.__version__)  # (files without the metadata key too)
        if self.device == "cuda" and self.inplace and self.kv_dtype != np.float16:
            kind = "an int8-cache" if self.kv_dtype == np.int8 else "an fp32"
            raise ConfigError(  # ONNX Runtime's CUDA GroupQueryAttention takes fp16/bf16 only
                f"{path} is {kind} --kv-cache inplace export, which ONNX Runtime runs on the CPU "
                "only; use --device cpu, or export with --kv-cache inplace --dtype fp16 for CUDA"
            )
        self._output_names = output_names(self.metadata.n_layer)

    def _check_io(self) -> tuple[list[str], list[str]]:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        n_layer = self.metadata.n_layer
        past, present = past_names(n_layer), present_names(n_layer)
        missing = sorted(set(input_names(n_layer)) - inputs)
        missing += sorted(set(output_names(n_layer)) - outputs)
        if missing:
            raise ModelFileError(
                f"{self.path} lacks gptkit's inputs/outputs ({', '.join(missing[:3])}); "
                "re-export it with `gptkit export`"
            )
        expected = {1: self.metadata.n_head, 3: self.metadata.head_dim}
        for i in self.session.get_inputs():
            if i.name in past and len(i.shape) == 4:
                for axis, size in expected.items():
                    if isinstance(i.shape[axis], int) and i.shape[axis] != size:
                        raise ModelFileError(
                            f"{self.path}: the graph's {i.name} shape {i.shape} does not match "
                            f"its metadata (n_head {self.metadata.n_head}, head_dim "
                            f"{self.metadata.head_dim}); re-export it with `gptkit export`"
                        )
        return past, present

    def empty_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """The cache before the prompt step.

        Default graphs: zero-length past tensors (batch, n_head, 0, head_dim): one graph takes a past of length 0 for the prompt. In-place
        graphs: buffers for ``capacity`` positions (default and at most ``block_size``), so pass
        what the generation can reach (prompt + new tokens) to keep memory down.
        """
        m = self.metadata
        if not self.inplace:
            empty = np.zeros((batch, m.n_head, 0, m.head_dim), dtype=self.kv_dtype)
            return KVCache(values=tuple(empty for _ in self.past_names), length=0)
        capacity = min(capacity or m.block_size, m.block_size)
        shape = (batch, m.n_head, capacity, m.head_dim)
        # Zeroed pages are mapped lazily, so untouched capacity costs no memory.
        if self.device == "cuda":  # the buffers live on the GPU; ``values`` are those OrtValues
            ort_values = tuple(
                ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", 0)
                for _ in self.past_names
            )
            return self._bind(ort_values, ort_values, 0)
        return self.bind_buffers(
            tuple(np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names)
        )

    def bind_buffers(self, buffers: tuple[np.ndarray, ...], length: int = 0) -> KVCache:
        """An in-place cache over caller-owned CPU buffers [B, n_head, capacity, head_dim].

        ONNX Runtime reads and writes the numpy memory itself (a contiguous view of a larger
        buffer works too), so a caller can lay several requests out in one buffer and move
        their columns between steps; ``runtime.engine`` does.
        """
        if not self.inplace or self.device != "cpu":
            raise ConfigError("bind_buffers needs a --kv-cache inplace export on the CPU")
        for buffer in buffers:
            if not buffer.flags.c_contiguous or buffer.dtype != self.kv_dtype:
                raise ValueError("KV buffers must be C-contiguous arrays of the cache's dtype")
        ort_values = tuple(ort.OrtValue.ortvalue_from_numpy(b) for b in buffers)
        return self._bind(buffers, ort_values, length)

    def _bind(self, buffers: tuple[Any, ...], ort_values: tuple[Any, ...], length: int) -> KVCache:
        binding = self.session.io_binding()
        for past, present, value in zip(
            self.past_names, self.present_names, ort_values, strict=True
        ):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same buffer: written in place
        shape = ort_values[0].shape()
        batch, capacity = shape[0], shape[2]
        step = DecodeBuffers(batch, self.metadata.vocab_size)
        return KVCache(buffers, length, binding, ort_values, capacity, step)

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        *,
        reuse: bool = False,
    ) -> tuple[np.ndarray, KVCache]:
        """One forward pass: logits [B, T, V] as numpy, and the cache grown by T positions.

        ``reuse=True``: a one-token step on an in-place cache may return its logits in the
        cache's step buffer, which the next step on that cache overwrites (no copy: a caller
        that reads them first, like the generation loop, saves B x vocab floats a step).
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        length = cache.length + input_ids.shape[1]
        if attention_mask.shape != (input_ids.shape[0], length):
            raise ValueError(  # a bug in the caller, not a user mistake
                f"attention_mask {attention_mask.shape} != (batch, past + new) "
                f"({input_ids.shape[0]}, {length})"
            )
        if cache.binding is not None:
            return self._run_inplace(input_ids, attention_mask, position_ids, cache, length, reuse)
        if not self.io_binding:
            feeds = {
                INPUT_IDS: input_ids,
                ATTENTION_MASK: attention_mask,
                POSITION_IDS: position_ids,
                **dict(zip(self.past_names, cache.values, strict=True)),
            }
            try:
                logits, *presents = self.session.run(self._output_names, feeds)
            except _ORT_ERRORS as e:
                raise self._run_failed(e) from None
            return logits, KVCache(tuple(presents), length)
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, input_ids)
        binding.bind_cpu_input(ATTENTION_MASK, attention_mask)
        binding.bind_cpu_input(POSITION_IDS, position_ids)
        for name, value in zip(self.past_names, cache.values, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)  # stays where it was computed
        try:
            self.session.run_with_iobinding(binding)
        except _ORT_ERRORS as e:
            raise self._run_failed(e) from None
        logits, *presents = binding.get_outputs()
        return logits.numpy(), KVCache(tuple(presents), length)

    def _run_inplace(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        length: int,
        reuse: bool = False,
    ) -> tuple[np.ndarray, KVCache]:
        """A step on a shared buffer: the graph writes rows [P, P+T) of every cache buffer."""
        if length > cache.capacity:
            raise ValueError(  # a bug in the caller, not a user mistake
                f"{length} positions do not fit the cache's capacity of {cache.capacity}"
            )
        binding = cache.binding
        batch, new = input_ids.shape
        step = cache.step
        if new == 1 and step is not None and step.ids.shape[0] == batch:
            # A decode step: ids, positions and logits live in buffers bound once per cache;
            # only the mask (one column wider each step) is bound anew.
            if not step.bound:
                binding.bind_ortvalue_input(INPUT_IDS, step.ids_value)
                binding.bind_ortvalue_input(POSITION_IDS, step.positions_value)
                binding.bind_ortvalue_output(LOGITS, step.logits_value)
                step.bound = True
            step.ids[...] = input_ids
            step.positions[...] = position_ids
            binding.bind_cpu_input(ATTENTION_MASK, attention_mask)
            logits = step.logits
        else:
            binding.bind_cpu_input(INPUT_IDS, input_ids)
            binding.bind_cpu_input(POSITION_IDS, position_ids)
            binding.bind_cpu_input(ATTENTION_MASK, attention_mask)
            logits = np.empty((batch, new, self.metadata.vocab_size), dtype=np.float32)
            binding.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
            if step is not None:
                step.bound = False
        try:
            self.session.run_with_iobinding(binding)
        except _ORT_ERRORS as e:
            raise self._run_failed(e) from None
        if not reuse and step is not None and logits is step.logits:
            logits = logits.copy()  # the buffer is rewritten by the next step
        cache = KVCache(cache.values, length, binding, cache.ort_values, cache.capacity, step)
        return logits, cache

    def _run_failed(self, error: Exception) -> ModelFileError:
        """An ONNX Runtime failure on inputs the runtime built itself: the file is at fault."""
        reason = str(error).strip().splitlines()[0][-200:] if str(error).strip() else ""
        return ModelFileError(
            f"onnxruntime failed running {self.path} ({reason or type(error).__name__}); the "
            "file does not match its metadata or is damaged: re-export it with `gptkit export`"
        )


def _in_background(work: Callable[[], _T]) -> Callable[[], _T]:
    """Start ``work`` on a thread now; the returned function waits and returns or raises."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as e:  # handed to the caller's thread
            outcome.append((False, e))

    thread = threading.Thread(target=run, name="gptkit-load", daemon=True)
    thread.start()

    def result() -> _T:
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        done: _T = value
        return done

    return result


def ort_supports_kv_quant(version: str) -> bool:
    """Whether an onnxruntime of this version runs a quantized GroupQueryAttention cache on CPU."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= KV_QUANT_MIN_ORT


def _check_kv_quant(path: Path, version: str) -> None:
    if not ort_supports_kv_quant(version):
        need = ".".join(map(str, KV_QUANT_MIN_ORT))
        raise ConfigError(
            f"{path} has an int8 KV cache, which needs onnxruntime >= {need} (this is {version}); "
            "pip install -U onnxruntime, or re-export without --kv-cache-dtype"
        )


def _metadata_from_file(path: Path) -> ModelMetadata | None:
    """The metadata read without a session, or None: the session's copy then decides, and
    raises the usual error for a file that is not a (valid) gptkit export."""
    props = read_props(path)
    if props is None:
        return None
    try:
        return ModelMetadata.from_props(props, source=str(path))
    except GptkitError:
        return None


def _check_options(device: str, threads: int | None, optimization: str) -> None:
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose cpu or cuda")
    if optimization not in OPTIMIZATION_LEVELS:
        choices = ", ".join(OPTIMIZATION_LEVELS)
        raise ConfigError(f"unknown optimization level {optimization!r}; choose {choices}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise ConfigError(f"threads must be an integer, got {threads!r}")
    if threads is not None and threads <= 0:
        raise ConfigError(f"threads must be positive, got {threads}")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(f"model file {path} not found; export one with `gptkit export {path}`")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file; pass the path of an exported .onnx model")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes); re-export it with `gptkit export`")


def _providers(device: str, allow_fallback: bool) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if allow_fallback:
        return ["CPUExecutionProvider"]
    raise ConfigError(
        "device cuda needs onnxruntime-gpu (this onnxruntime has no CUDA provider); install it "
        "with: pip uninstall onnxruntime && pip install onnxruntime-gpu"
    )
