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


def machine_busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy so far, all cores (/proc/stat; steal included:
    time this VM's cores wanted to run but the host ran something else)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields)
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds used by this process's finished children (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    model_dir: Path,
    config: dict[str, Any],
    filename: str = "model.onnx",
    *,
    share_buffer: bool = False,
) -> Path:
    """genai_config.json for onnxruntime-genai's generic ``decoder`` type over a gptkit export.

    ``share_buffer`` is genai's ``past_present_share_buffer``. It must be false for the default
    export: that graph concatenates the cache, so present.* grows by one position per step and
    cannot alias a max-length past buffer. It is true for ``kv_cache="inplace"`` exports, whose
    GroupQueryAttention writes the new positions into the past buffer when past and present are
    the same OrtValue: genai then allocates one (batch, heads, max_length, head_dim) buffer per
    layer and binds it as both. genai refuses a max_length above context_length (block_size); the
    benchmark's generations (prompt + new tokens) stay within it.
    """
    n_head, n_embd = config["n_head"], config["n_embd"]
    eos = config["vocab_size"] - 1
    max_length = min(PROMPT_LEN + NEW_TOKENS, config["block_size"])
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
            "max_length": max_length,
            "min_length": max_length,
            "past_present_share_buffer": share_buffer,
            "top_k": 1,
            "temperature": 1.0,
        },
    }
    path = model_dir / "genai_config.json"
    path.write_text(json.dumps(genai, indent=2) + "\n")
    return path


def onnx_io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The Optimum / onnxruntime-genai names every gptkit export uses.

    Spelled out here rather than imported from export.onnx_export, which imports torch: the
    numpy + onnxruntime loop must stay torch-free so its start-up time and peak RSS are its own.
    """
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def warm_runtime_cache(manifest: dict, artifacts: list[str]) -> list[str]:
    """Load each export once with ``runtime.load`` so the runtime's optimised-graph cache
    (runtime.graph_cache, used for large models) holds it before anything is timed, as
    ``gptkit export`` leaves it. Returns a note per file (which loads went through the cache)."""
    import runtime.model

    notes = []
    for name in artifacts:
        path = manifest["exports"][name]["path"]
        model = runtime.model.load(path, threads=THREADS)
        session = getattr(model, "_session", None)
        cached = getattr(session, "cached", None)
        notes.append(f"{name}: {'through the load cache' if cached else 'plain load'}")
    return notes


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


# Exports made for each shape: directory -> (precision, ExportOptions.kv_cache). "fp32"/"int8" are
# the default export (standard ONNX, the cache concatenated each step); "inplace-*" are
# ``--kv-cache inplace`` (ORT's GroupQueryAttention writing into a shared past/present buffer).
ARTIFACTS = {
    "fp32": ("fp32", "concat"),
    "int8": ("int8", "concat"),
    "inplace-fp32": ("fp32", "inplace"),
    "inplace-int8": ("int8", "inplace"),
}


def prepare_artifacts(
    shape: str,
    root: Path,
    *,
    exporter: str = "auto",
    force: bool = False,
    artifacts: list[str] | None = None,
) -> dict:
    """Random-init weights (seed 0) and their ONNX exports, cached under root/shape.

    Layout: weights.pt (state dict for PyTorch and Hugging Face), <artifact>/model.onnx for each
    of ``artifacts`` (default: all of ARTIFACTS), each with a genai_config.json beside it, and
    manifest.json. Exports already there with the same stamp are kept; missing ones are added.
    """
    artifacts = list(artifacts or ARTIFACTS)
    config = bench_config(shape)
    shape_dir = root / shape
    manifest_path = shape_dir / "manifest.json"
    stamp = {
        "config": config,
        "weight_seed": WEIGHT_SEED,
        "exporter": exporter,
        "export_source": _exporter_fingerprint(),
    }
    manifest = None
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("stamp") != stamp or not (shape_dir / "weights.pt").exists():
            manifest = None
    exports = {
        name: export
        for name, export in (manifest or {}).get("exports", {}).items()
        if Path(export["path"]).exists() and "kv_cache" in export
    }
    missing = [name for name in artifacts if name not in exports]
    if manifest is not None and not missing:
        for export in exports.values():  # cheap, and keeps them in step with this file
            _write_genai_config_for(Path(export["path"]), config, export["kv_cache"])
        return manifest

    import torch

    from gpt_core.config import GPTConfig
    from gpt_core.model import GPT

    torch.manual_seed(WEIGHT_SEED)
    model = GPT(GPTConfig.from_dict(config)).eval()
    shape_dir.mkdir(parents=True, exist_ok=True)
    if manifest is None:  # new or changed weights: every export is rebuilt from them
        torch.save(model.state_dict(), shape_dir / "weights.pt")
        exports, missing = {}, artifacts
    tokenizer = bench_tokenizer(config["vocab_size"])
    for name in missing:
        precision, kv_cache = ARTIFACTS[name]
        path = shape_dir / name / "model.onnx"
        path.parent.mkdir(exist_ok=True)
        start = time.perf_counter()
        used, note = _export(model, tokenizer, path, precision, kv_cache)
        exports[name] = {
            "path": str(path),
            "precision": precision,
            "kv_cache": kv_cache,
            "exporter": used,
            "note": note,
            "seconds": round(time.perf_counter() - start, 1),
            "megabytes": round(path.stat().st_size / 1e6, 1),
        }
        _write_genai_config_for(path, config, kv_cache)
    manifest = {
        "shape": shape,
        "stamp": stamp,
        "config": config,
        "n_params": model.num_params(),
        "weights": str(shape_dir / "weights.pt"),
        "exports": {name: exports[name] for name in ARTIFACTS if name in exports},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_genai_config_for(path: Path, config: dict[str, Any], kv_cache: str) -> None:
    write_genai_config(path.parent, config, path.name, share_buffer=kv_cache == "inplace")


def _export(model, tokenizer, path: Path, precision: str, kv_cache: str) -> tuple[str, str]:
    """Export with gptkit's own exporter, as a user would (`gptkit export [--quantize int8]
    [--kv-cache inplace]`)."""
    from export.onnx_export import ExportOptions, export_onnx

    options = ExportOptions(quantize="int8" if precision == "int8" else None, kv_cache=kv_cache)
    export_onnx(model, tokenizer, path, options=options, source="benchmarks")
    flag = " --kv-cache inplace" if kv_cache == "inplace" else ""
    return f"gptkit export_onnx{flag}", ""


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
