"""The benchmarks' model files: random-init weights, their ONNX exports and genai_config.json.

Made once per shape under the work directory and reused until the shape, the seed or the
exporter's source changes. torch and the exporter are imported only when something is built.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import _common as common

from runtime import onnx_contract as contract

# Exports made for each shape: directory -> (precision, ExportOptions.kv_cache,
# ExportOptions.kv_cache_dtype). "fp32"/"int8"/"int4" are the default export (standard ONNX, the
# cache concatenated each step); "inplace-*" are ``--kv-cache inplace`` (ORT's GroupQueryAttention
# writing into a shared past/present buffer); "*-kv8" add ``--kv-cache-dtype int8``.
ARTIFACTS: dict[str, tuple[str, str, str | None]] = {
    "fp32": ("fp32", contract.KV_CONCAT, None),
    "int8": ("int8", contract.KV_CONCAT, None),
    "inplace-fp32": ("fp32", contract.KV_INPLACE, None),
    "inplace-int8": ("int8", contract.KV_INPLACE, None),
    "int4": ("int4", contract.KV_CONCAT, None),
    "inplace-int4": ("int4", contract.KV_INPLACE, None),
    "inplace-fp32-kv8": ("fp32", contract.KV_INPLACE, "int8"),
    "inplace-int8-kv8": ("int8", contract.KV_INPLACE, "int8"),
    "inplace-int4-kv8": ("int4", contract.KV_INPLACE, "int8"),
}
QUANTIZED = ("int8", "int4")  # precisions that are an ExportOptions.quantize


def artifact_name(precision: str, kv_cache: str, kv_cache_dtype: str | None = None) -> str:
    """The ARTIFACTS key of the export with this precision and cache mode."""
    for name, spec in ARTIFACTS.items():
        if spec == (precision, kv_cache, kv_cache_dtype):
            return name
    raise ValueError(f"no benchmark export for {precision} with kv_cache={kv_cache!r}")


def prepare_artifacts(
    shape: str,
    root: Path,
    *,
    force: bool = False,
    artifacts: list[str] | None = None,
) -> dict:
    """Random-init weights (seed 0) and their ONNX exports, cached under root/shape.

    Layout: weights.pt (state dict for PyTorch and Hugging Face), <artifact>/model.onnx for each
    of ``artifacts`` (default: all of ARTIFACTS), each with a genai_config.json beside it, and
    manifest.json. Exports already there with the same stamp are kept; missing ones are added.
    """
    artifacts = list(artifacts or ARTIFACTS)
    config = common.bench_config(shape)
    shape_dir = root / shape
    manifest_path = shape_dir / "manifest.json"
    stamp = {
        "config": config,
        "weight_seed": common.WEIGHT_SEED,
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

    torch.manual_seed(common.WEIGHT_SEED)
    model = GPT(GPTConfig.from_dict(config)).eval()
    shape_dir.mkdir(parents=True, exist_ok=True)
    if manifest is None:  # new or changed weights: every export is rebuilt from them
        torch.save(model.state_dict(), shape_dir / "weights.pt")
        exports, missing = {}, artifacts
    tokenizer = bench_tokenizer(config["vocab_size"])
    for name in missing:
        precision, kv_cache, kv_cache_dtype = ARTIFACTS[name]
        path = shape_dir / name / "model.onnx"
        path.parent.mkdir(exist_ok=True)
        start = time.perf_counter()
        exports[name] = {
            "path": str(path),
            "precision": precision,
            "kv_cache": kv_cache,
            "kv_cache_dtype": kv_cache_dtype,
            "exporter": _export(model, tokenizer, path, precision, kv_cache, kv_cache_dtype),
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


def _exporter_fingerprint() -> str:
    """Changes whenever the exporter's source or the ONNX contract does, so cached exports are
    rebuilt."""
    import hashlib  # here, not at the top: a worker's cold start is its system's, not OpenSSL's

    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for path in [*sorted((root / "export").glob("*.py")), Path(contract.__file__)]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _export(
    model, tokenizer, path: Path, precision: str, kv_cache: str, kv_cache_dtype: str | None
) -> str:
    """Export with gptkit's own exporter, as a user would (`gptkit export [--quantize int8|int4]
    [--kv-cache inplace [--kv-cache-dtype int8]]`); returns how, in words."""
    from export.onnx_export import ExportOptions, export_onnx

    quantize = precision if precision in QUANTIZED else None
    options = ExportOptions(quantize=quantize, kv_cache=kv_cache, kv_cache_dtype=kv_cache_dtype)
    result = export_onnx(model, tokenizer, path, options=options, source="benchmarks")
    flag = f" --quantize {quantize}" if quantize else ""
    flag += f" --kv-cache {kv_cache}" if kv_cache != contract.KV_CONCAT else ""
    flag += f" --kv-cache-dtype {kv_cache_dtype}" if kv_cache_dtype else ""
    assert result.parity is not None
    return f"gptkit export_onnx{flag} (parity max |diff| {result.parity.worst:.3g})"


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


def _write_genai_config_for(path: Path, config: dict[str, Any], kv_cache: str) -> None:
    """genai_config.json beside an export, by gptkit's own writer (the one `gptkit export --format
    genai` uses; past_present_share_buffer follows ``kv_cache``), for the benchmark's workload:
    max_length = min_length = prompt + new tokens (genai refuses more than block_size), so every
    system generates the same count, and THREADS intra-op threads."""
    from export.genai_export import write_genai_config

    length = min(common.PROMPT_LEN + common.NEW_TOKENS, config["block_size"])
    write_genai_config(
        path.parent,
        config,
        eos_token_id=config["vocab_size"] - 1,  # bench_tokenizer puts <|endoftext|> last
        kv_cache=kv_cache,
        filename=path.name,
        max_length=length,
        min_length=length,
        session_options={"intra_op_num_threads": common.THREADS, "inter_op_num_threads": 1},
    )


def warm_runtime_cache(manifest: dict, artifacts: list[str]) -> list[str]:
    """Load each export once with ``runtime.load`` so the runtime's optimised-graph cache
    (runtime.graph_cache, used for large models) holds it before anything is timed, as
    ``gptkit export`` leaves it. Returns a note per file (which loads went through the cache)."""
    import runtime.model

    notes = []
    for name in artifacts:
        path = manifest["exports"][name]["path"]
        model = runtime.model.load(path, threads=common.THREADS)
        session = getattr(model, "_session", None)
        cached = getattr(session, "cached", None)
        notes.append(f"{name}: {'through the load cache' if cached else 'plain load'}")
    return notes
