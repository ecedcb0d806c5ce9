"""Shared pieces of the benchmarks: the workload, machine measurements and model artifacts.

Nothing here imports torch at module level: the gptkit-runtime and onnxruntime-genai workers import
this file too and must stay torch-free, so their start-up time and peak RSS are their own.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

THREADS = 2  # intra-op threads for every system (the project machine has 2 cores)

# Every BLAS/OpenMP pool gets THREADS threads; OpenBLAS reads this when numpy is first imported.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))

import numpy as np  # noqa: E402

PROMPT_LEN = 32
NEW_TOKENS = 128
WEIGHT_SEED = 0  # torch.manual_seed before building the model
PROMPT_SEED = 1234  # numpy.random.default_rng seed for the prompt ids
# tiny (64) and small-cpu (128) have contexts shorter than the 32 + 128 tokens of the workload; the
# benchmark builds them with this block size instead (only the position table grows).
MIN_BLOCK_SIZE = 256
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "gptkit-bench"  # weights and exports, reused


# ---- the workload ------------------------------------------------------------------------------


def bench_config(shape: str) -> dict[str, Any]:
    """The GPTConfig (as a dict) a shape is benchmarked with: the preset, block_size >= 256."""
    from gpt_core.config import GPTConfig  # torch-free module

    cfg = GPTConfig.preset(shape)
    if cfg.block_size < MIN_BLOCK_SIZE:
        cfg = cfg.replace(block_size=MIN_BLOCK_SIZE)
    return cfg.replace(dropout=0.0).to_dict()


def prompt_ids(batch: int, vocab_size: int) -> np.ndarray:
    """The same (batch, 32) int64 prompt for every system: row i is the same for every batch size."""
    rng = np.random.default_rng(PROMPT_SEED)
    return rng.integers(0, min(vocab_size, 50256), size=(batch, PROMPT_LEN), dtype=np.int64)


def probe_positions(block_size: int, new_tokens: int) -> list[int]:
    """Prompt lengths at which decode steps are timed: ~16, ~256 and near block_size.

    A probe generates ``new_tokens`` after the prompt, so the last one ends just inside the context.
    """
    positions = [16]
    if 256 < block_size - 64:
        positions.append(256)
    positions.append(block_size - new_tokens - 3)
    return positions


# ---- timing and memory --------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM, in MiB).

    Not ru_maxrss: Linux carries that across fork+exec, so a worker would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _threaded(fn, parts: list[tuple]) -> None:
    """Run fn(*part) on one thread per part (numpy releases the GIL inside big reductions/copies)."""
    threads = [threading.Thread(target=fn, args=part) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def measure_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict[str, float]:
    """DRAM bandwidth in GB/s from numpy: sum (read) and copy (read + write), 1 and 2 threads.

    The array is 16x the 32 MB L3 cache, so every pass streams from memory. Best of ``repeats``.
    """
    n = megabytes * 2**20 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    half = n // 2
    halves = [(src[:half], dst[:half]), (src[half:], dst[half:])]
    nbytes = src.nbytes
    sum_1 = _best_of(lambda: src.sum(), repeats)
    copy_1 = _best_of(lambda: np.copyto(dst, src), repeats)
    sum_2 = _best_of(lambda: _threaded(lambda a, _b: a.sum(), halves), repeats)
    copy_2 = _best_of(lambda: _threaded(lambda a, b: np.copyto(b, a), halves), repeats)
    return {
        "sum_1t": nbytes / sum_1 / 1e9,
        "sum_2t": nbytes / sum_2 / 1e9,
        "copy_1t": 2 * nbytes / copy_1 / 1e9,  # bytes read + bytes written
        "copy_2t": 2 * nbytes / copy_2 / 1e9,
    }


def measure_gemm_gflops(n: int = 2048, repeats: int = 3) -> float:
    """fp32 matrix-multiply throughput of numpy's BLAS (THREADS threads), GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    return 2 * n**3 / _best_of(lambda: a @ b, repeats) / 1e9


# ---- the physical floor -------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of weights one decode step must stream from memory (each read once per step)."""

    matmul_params: int  # the 4 linear layers of every block plus the output head (= wte)
    other_params: int  # biases and LayerNorms (embedding lookups read one row: not counted)

    def per_token(self, precision: str) -> int:
        matmul_bytes = 1 if precision == "int8" else 4  # int8 files quantise exactly the MatMuls
        return self.matmul_params * matmul_bytes + self.other_params * 4


def weight_bytes(config: dict[str, Any]) -> WeightBytes:
    c, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    per_layer_matmul = 12 * c * c  # c_attn 3C², attn c_proj C², c_fc 4C², mlp c_proj 4C²
    per_layer_other = (3 * c + c + 4 * c + c) + 4 * c  # biases, then ln_1 and ln_2
    return WeightBytes(
        matmul_params=layers * per_layer_matmul + vocab * c,
        other_params=layers * per_layer_other + 2 * c,  # + ln_f
    )


# ---- the machine --------------------------------------------------------------------------------


VERSION_PACKAGES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-genai",
    "onnx",
    "torch",
    "transformers",
    "tiktoken",
)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "simd": ", ".join(simd) or "unknown",
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": os.getloadavg(),
        "versions": package_versions(),
    }


# ---- artifacts ----------------------------------------------------------------------------------


def write_genai_config(
    model_dir: Path, config: dict[str, Any], filename: str = "model.onnx"
) -> Path:
    """genai_config.json for onnxruntime-genai's generic ``decoder`` type over a gptkit export.

    ``past_present_share_buffer`` must be false: the graph concatenates the cache, so present.*
    grows by one position per step and cannot alias a max-length past buffer.
    """
    n_head, n_embd = config["n_head"], config["n_embd"]
    eos = config["vocab_size"] - 1
    genai = {
        "model": {
            "type": "decoder",
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "vocab_size": config["vocab_size"],
            "context_length": config["block_size"],
            "decoder": {
                "session_options": {
                    "intra_op_num_threads": THREADS,
                    "inter_op_num_threads": 1,
                    "provider_options": [],
                },
                "filename": filename,
                "head_size": n_embd // n_head,
                "hidden_size": n_embd,
                "num_attention_heads": n_head,
                "num_key_value_heads": n_head,
                "num_hidden_layers": config["n_layer"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": PROMPT_LEN + NEW_TOKENS,
            "min_length": PROMPT_LEN + NEW_TOKENS,
            "past_present_share_buffer": False,
            "top_k": 1,
            "temperature": 1.0,
        },
    }
    path = model_dir / "genai_config.json"
    path.write_text(json.dumps(genai, indent=2) + "\n")
    return path


def onnx_io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The Optimum / onnxruntime-genai names every gptkit export uses."""
    from export.onnx_export import input_names, output_names

    return input_names(n_layer), output_names(n_layer)


def bench_tokenizer(vocab_size: int):
    """A byte-level tokenizer with exactly ``vocab_size`` ids (<|endoftext|> last).

    The benchmark feeds random token ids, so the tokenizer only has to cover the vocabulary: the
    gptkit runtime never chooses an id its tokenizer cannot decode, and a smaller tokenizer would
    make its greedy choices differ from the other systems'.
    """
    from runtime.tokenizer import Tokenizer

    ranks = {bytes([b]): b for b in range(256)}
    for first in range(256):
        for second in range(256):
            if len(ranks) >= vocab_size - 1:
                return Tokenizer.from_ranks(ranks, name=f"bench-{vocab_size}")
            ranks[bytes([first, second])] = len(ranks)
    raise ValueError(f"vocab_size {vocab_size} is too large for the benchmark tokenizer")


def _exporter_fingerprint() -> str:
    """Changes whenever the exporter's source does, so cached exports are rebuilt."""
    import hashlib

    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent / "export"
    for path in sorted(root.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def prepare_artifacts(
    shape: str, root: Path, *, exporter: str = "auto", force: bool = False
) -> dict:
    """Random-init weights (seed 0) and their fp32 and int8 ONNX exports, cached under root/shape.

    Layout: weights.pt (state dict for PyTorch and Hugging Face), fp32/model.onnx and
    int8/model.onnx (each with a genai_config.json beside it), manifest.json.
    """
    config = bench_config(shape)
    shape_dir = root / shape
    manifest_path = shape_dir / "manifest.json"
    stamp = {
        "config": config,
        "weight_seed": WEIGHT_SEED,
        "exporter": exporter,
        "export_source": _exporter_fingerprint(),
    }
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
        files = [shape_dir / "weights.pt"] + [
            shape_dir / p / "model.onnx" for p in ("fp32", "int8")
        ]
        if manifest.get("stamp") == stamp and all(f.exists() for f in files):
            return manifest

    import torch

    from gpt_core.config import GPTConfig
    from gpt_core.model import GPT

    torch.manual_seed(WEIGHT_SEED)
    model = GPT(GPTConfig.from_dict(config)).eval()
    shape_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), shape_dir / "weights.pt")
    tokenizer = bench_tokenizer(config["vocab_size"])
    exports = {}
    for precision in ("fp32", "int8"):
        path = shape_dir / precision / "model.onnx"
        path.parent.mkdir(exist_ok=True)
        start = time.perf_counter()
        used, note = _export(model, tokenizer, path, precision, exporter)
        exports[precision] = {
            "path": str(path),
            "exporter": used,
            "note": note,
            "seconds": round(time.perf_counter() - start, 1),
            "megabytes": round(path.stat().st_size / 1e6, 1),
        }
        write_genai_config(path.parent, config)
    manifest = {
        "shape": shape,
        "stamp": stamp,
        "config": config,
        "n_params": model.num_params(),
        "weights": str(shape_dir / "weights.pt"),
        "exports": exports,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _export(model, tokenizer, path: Path, precision: str, exporter: str) -> tuple[str, str]:
    """Export with gptkit's own exporter, as a user would (``exporter`` is kept for the CLI)."""
    from export.onnx_export import ExportOptions, export_onnx

    options = ExportOptions(quantize="int8" if precision == "int8" else None)
    export_onnx(model, tokenizer, path, options=options, source="benchmarks")
    return "gptkit export_onnx", ""


def runtime_tokens(model, rows: list[list[int]], new_tokens: int):
    """Greedy (row, token) pairs from a gptkit ``runtime.Model``, for token-id prompts.

    ``Model.generate_tokens`` is the token-level loop under ``Model.generate`` (which takes text;
    the benchmark feeds random ids): the same prefill, cache steps and token choice.
    """
    stream = model.generate_tokens(
        rows, max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False
    )
    for token in stream:
        yield token.row, token.id
