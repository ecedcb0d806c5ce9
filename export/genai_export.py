"""`gptkit export DIR --format genai`: a folder onnxruntime-genai opens as it is.

The folder holds ``model.onnx`` (gptkit's own export, parity-checked, with any variant),
``genai_config.json`` for genai's generic ``decoder`` type, and the Hugging Face tokenizer files
genai's tokenizer reads. genai binds the graph by the names in the config, and those come from
:mod:`runtime.onnx_contract`, so the hand-off cannot drift from what the exporter writes.

The folder is built in a hidden staging directory beside the target and renamed into place only
when complete: a failed export (parity, tokenizer) leaves the target as it was. A non-empty
target is replaced only when it is itself a previous gptkit genai export.

Module level is torch-free (the exporter is imported inside :func:`export_genai`), so the
benchmarks' torch-free workers can use :func:`write_genai_config`, the one genai_config writer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.directories import check_output_dir, publish_directory, staged_directory
from export.options import ExportOptions
from runtime import onnx_contract as contract
from runtime.errors import ExportError
from runtime.files import atomic_write_bytes
from runtime.metadata import KEY_FORMAT

if TYPE_CHECKING:  # pragma: no cover
    from export.parity import ParityReport
    from gpt_core.model import GPT
    from runtime.tokenizer import Tokenizer

MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
# How a gptkit .onnx is recognised without parsing it (a gpt2 file is 500 MB): onnx writes
# ModelProto's fields in number order, so the metadata (field 14, after the graph) with gptkit's
# keys sits in the file's tail, under the size of the largest tokenizer it carries.
_METADATA_KEY = KEY_FORMAT.encode()
_TAIL_BYTES = 16 << 20


@dataclass
class GenaiExportResult:
    """What `export_genai` made: the folder, the inner export's parity report, notes for the user."""

    path: Path
    parity: ParityReport | None = None  # None when exported with verify=False
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # the folder's file names


def genai_config(
    config: Mapping[str, Any],
    *,
    eos_token_id: int,
    kv_cache: str,
    filename: str = MODEL_FILE,
    max_length: int | None = None,
    min_length: int = 0,
    session_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """genai_config.json's content for genai's ``decoder`` type over a gptkit export.

    config: the GPTConfig as a dict (n_layer, n_head, n_embd, block_size, vocab_size). The
    decoder's keys are genai's field names; its values the export's I/O names.

    ``past_present_share_buffer`` follows the export's cache kind. It must be false for the
    default (concat) export: that graph concatenates the cache, so present.* grows by one position
    per step and cannot alias a max-length past buffer. It is true for ``kv_cache="inplace"``
    exports, whose GroupQueryAttention writes the new positions into the past buffer when past and
    present are the same OrtValue: genai then allocates one (batch, heads, max_length, head_dim)
    buffer per layer and binds it as both. genai refuses a max_length above context_length
    (block_size), so max_length defaults to block_size.
    """
    if kv_cache not in contract.KV_CACHE_MODES:
        raise ExportError(f"unknown KV cache {kv_cache!r}; choose concat or inplace")
    n_head, n_embd, block_size = config["n_head"], config["n_embd"], config["block_size"]
    max_length = block_size if max_length is None else min(max_length, block_size)
    options = {"log_id": "onnxruntime-genai", "provider_options": [], **(session_options or {})}
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": eos_token_id,  # GPT-2 has one control token: <|endoftext|>
            "eos_token_id": eos_token_id,
            "pad_token_id": eos_token_id,
            "vocab_size": config["vocab_size"],  # the logits' width (may exceed the tokenizer's)
            "context_length": block_size,
            "decoder": {
                "session_options": options,
                "filename": filename,
                "head_size": n_embd // n_head,
                "hidden_size": n_embd,
                "num_attention_heads": n_head,
                "num_key_value_heads": n_head,
                "num_hidden_layers": config["n_layer"],
                "inputs": {
                    "input_ids": contract.INPUT_IDS,
                    "attention_mask": contract.ATTENTION_MASK,
                    "position_ids": contract.POSITION_IDS,
                    "past_key_names": contract.genai_template(contract.PAST_KEY),
                    "past_value_names": contract.genai_template(contract.PAST_VALUE),
                },
                "outputs": {
                    "logits": contract.LOGITS,
                    "present_key_names": contract.genai_template(contract.PRESENT_KEY),
                    "present_value_names": contract.genai_template(contract.PRESENT_VALUE),
                },
            },
        },
        "search": {
            "do_sample": False,  # greedy unless the caller's GeneratorParams say otherwise
            "num_beams": 1,
            "max_length": max_length,
            "min_length": min_length,
            "past_present_share_buffer": kv_cache == contract.KV_INPLACE,
            "top_k": 1,
            "temperature": 1.0,
        },
    }


def write_genai_config(directory: Path, config: Mapping[str, Any], **options: Any) -> Path:
    """Write :func:`genai_config` (same keyword arguments) as ``directory/genai_config.json``."""
    path = Path(directory) / CONFIG_FILE
    text = json.dumps(genai_config(config, **options), indent=2) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def export_genai(
    model: GPT,
    tokenizer: Tokenizer,
    directory: str | os.PathLike[str],
    *,
    options: ExportOptions | None = None,
    source: str | None = None,
    verify: bool = True,
) -> GenaiExportResult:
    """Export ``model`` as an onnxruntime-genai folder: stage, verify, then rename into place.

    options and verify go to :func:`export.onnx_export.export_onnx` for ``model.onnx`` (any
    dtype, int8, either cache kind; a failed parity check raises ParityError and writes nothing).
    """
    from export.hf_tokenizer import write_hf_tokenizer
    from export.onnx_export import export_onnx

    options = options or ExportOptions()
    options.validate()
    target = Path(directory)
    check_target(target)
    if tokenizer.eot_token < 0:
        raise ExportError(
            "the tokenizer has no <|endoftext|> token, which onnxruntime-genai needs as its "
            "end-of-sequence id; train or import one that has it"
        )
    with staged_directory(target) as staging:
        onnx_result = export_onnx(
            model, tokenizer, staging / MODEL_FILE, options=options, source=source, verify=verify
        )
        write_genai_config(
            staging,
            model.config.to_dict(),
            eos_token_id=tokenizer.eot_token,
            kv_cache=options.kv_cache,
        )
        write_hf_tokenizer(tokenizer, staging, model_max_length=model.config.block_size)
        files = sorted(p.name for p in staging.iterdir())
        publish_directory(staging, target)
    share = "on" if options.kv_cache == contract.KV_INPLACE else "off"
    notes = [
        *onnx_result.notes,
        f"genai: type decoder, past_present_share_buffer {share} (--kv-cache {options.kv_cache}), "
        f"max_length {model.config.block_size}, eos/bos/pad id {tokenizer.eot_token}",
    ]
    return GenaiExportResult(path=target, parity=onnx_result.parity, notes=notes, files=files)


def is_genai_export(directory: Path) -> bool:
    """Whether ``directory`` holds a gptkit genai export (safe to replace): a decoder config
    naming model.onnx, and a model.onnx with gptkit's metadata."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        with open(directory / MODEL_FILE, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
            tail = f.read()
    except (OSError, ValueError):
        return False
    model = config.get("model") if isinstance(config, dict) else None
    return (
        isinstance(model, dict)
        and model.get("type") == "decoder"
        and (model.get("decoder") or {}).get("filename") == MODEL_FILE
        and _METADATA_KEY in tail
    )


def check_target(target: Path) -> None:
    """Fail before any work when ``target`` cannot become (or replace) a genai export."""
    check_output_dir(target, is_ours=is_genai_export, kind="onnxruntime-genai")
