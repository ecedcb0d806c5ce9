"""A gptkit model as a Hugging Face GPT-2 directory: what transformers, vLLM and llama.cpp load.

gptkit's GPT is GPT-2 exactly (same parameter names, tanh GELU, LayerNorm eps 1e-5, tied head), so
the export is a config, a re-laid-out state dict (``gpt_core.hf``, the one place that knows the
layout, which the ``--hf`` import uses too) and the tokenizer (``export.hf_tokenizer``).

The directory is staged beside its target and renamed into place only when complete and, with
``verify=True``, after transformers itself has loaded it and given our logits on a left-padded
batch: a failed or interrupted export never leaves half a directory, and never replaces a good one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from export.directories import check_output_dir, publish_directory, staged_directory
from export.hf_tokenizer import write_hf_tokenizer
from gpt_core.hf import to_hf_state_dict
from gpt_core.model import GPT, fp32_cpu
from runtime.errors import ExportError, ParityError, require
from runtime.tokenizer import Tokenizer
from runtime.version import VERSION

TOLERANCE = 1e-5  # max |logit diff| vs transformers, scaled by max(1, max |logit|) (fp32 rounding)
MARKER = "gptkit"  # config.json key naming the exporter: what makes a directory ours to replace
SAMPLE_TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n  It is the east, and "
    "Juliet is the sun. 'Tis 1597; café, 世界 😀\t<|endoftext|>  "
)


@dataclass
class HfExportResult:
    path: Path
    files: dict[str, int]  # file name -> size in bytes
    n_params: int
    export_seconds: float = 0.0
    max_logit_diff: float | None = None  # vs transformers; None when not verified
    tolerance: float | None = None
    tokenizer_tokens: int = 0  # sample tokens transformers' tokenizer encoded identically
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(self.files.values())

    def parity_line(self) -> str:
        if self.max_logit_diff is None:
            return "Not verified with transformers: " + "; ".join(self.notes or ["verify=False"])
        return (
            f"Parity with transformers: logits max |diff| {self.max_logit_diff:.2e} on a "
            f"left-padded batch (tolerance {self.tolerance:.1e}); tokenizer ids identical on a "
            f"{self.tokenizer_tokens}-token sample"
        )


def export_hf(
    model: GPT,
    tokenizer: Tokenizer,
    directory: str | os.PathLike[str],
    *,
    source: str | None = None,
    verify: bool = True,
) -> HfExportResult:
    """Write ``directory`` as a Hugging Face GPT-2 model (config, safetensors, tokenizer).

    verify: load the staged directory with ``transformers.GPT2LMHeadModel`` and
        ``AutoTokenizer`` (when transformers is installed; else the result's notes say so) and
        compare logits and token ids with gptkit's; a mismatch raises ParityError and
        ``directory`` is left as it was. An existing ``directory`` is replaced only when it is
        empty or a previous gptkit export.
    """
    start = time.perf_counter()
    target = Path(directory)
    check_target(target)
    cfg = model.config
    if not cfg.bias:
        raise ExportError(
            "this model was trained with bias=False, but GPT-2 in Hugging Face always has "
            "biases (transformers' GPT2 has no bias option); export it as ONNX instead"
        )
    if tokenizer.n_vocab > cfg.vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer.n_vocab} ids but the model only {cfg.vocab_size}; "
            "they do not belong together"
        )
    require("safetensors", extra="train", purpose="exporting to Hugging Face format")
    from safetensors.torch import save_file

    with staged_directory(target) as staging:
        try:
            weights = to_hf_state_dict(model.state_dict())
            save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
            _write_json(staging / "config.json", hf_config_dict(model, tokenizer, source))
            _write_json(staging / "generation_config.json", _generation_config(tokenizer))
        except OSError as e:
            raise ExportError(f"cannot write {target}: {e.strerror or e}") from None
        write_hf_tokenizer(tokenizer, staging, model_max_length=cfg.block_size)
        result = HfExportResult(
            path=target,
            files={p.name: p.stat().st_size for p in sorted(staging.iterdir())},
            n_params=model.num_params(),
        )
        if verify:
            _verify(model, tokenizer, staging, target, result)
        try:
            publish_directory(staging, target)
        except OSError as e:
            raise ExportError(f"cannot move the export into {target}: {e.strerror or e}") from None
    result.export_seconds = time.perf_counter() - start
    return result


def hf_config_dict(model: GPT, tokenizer: Tokenizer, source: str | None) -> dict[str, Any]:
    """``config.json``: GPT2Config's fields, plus ``n_ctx`` (llama.cpp's converter reads it)
    and the gptkit config under ``"gptkit"``, which also marks the directory as our export."""
    cfg = model.config
    eot = tokenizer.eot_token if tokenizer.eot_token >= 0 else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GPT-2's tanh GELU
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "dtype": "float32",
        MARKER: {"version": VERSION, "source": source, "config": cfg.to_dict()},
    }


def _generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    eot = tokenizer.eot_token if tokenizer.eot_token >= 0 else None
    # pad = eos: batched generate() pads with it (and does not warn that it had to choose).
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}


# ---- verification with transformers -------------------------------------------------------------


def _verify(
    model: GPT, tokenizer: Tokenizer, staging: Path, target: Path, result: HfExportResult
) -> None:
    """Load the staged directory with transformers; compare logits and token ids with ours."""
    try:
        import transformers
    except ImportError:
        result.notes.append(
            "transformers is not installed, so the export was not loaded back "
            "(pip install transformers to check it)"
        )
        return
    with _quiet(transformers):
        hf = transformers.GPT2LMHeadModel.from_pretrained(staging, local_files_only=True).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(staging, local_files_only=True)
        got = hf_tok(SAMPLE_TEXT)["input_ids"]  # (a sample longer than the context warns)
        decoded = hf_tok.decode(got)
    ids, mask, positions = _left_padded_batch(model.config.block_size, tokenizer.n_vocab)
    ours_model = fp32_cpu(model)
    was_training = ours_model.training
    ours_model.eval()
    try:
        with torch.no_grad():
            ours = ours_model(ids, attention_mask=mask, position_ids=positions).logits
            theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    finally:
        ours_model.train(was_training)
    real = mask.bool()  # padded positions' logits are meaningless in both
    diff = float((ours[real] - theirs[real]).abs().max())
    tolerance = TOLERANCE * max(1.0, float(ours[real].abs().max()))
    result.max_logit_diff, result.tolerance = diff, tolerance
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"transformers' logits differ from gptkit's by {diff:.2e} (tolerance "
            f"{tolerance:.1e}), {target} not written; please report this as a gptkit bug"
        )
    expected = tokenizer.encode(SAMPLE_TEXT, allow_special=True)
    if got != expected or decoded != tokenizer.decode(expected):
        raise ParityError(
            f"transformers' tokenizer encodes a sample differently from gptkit's, {target} not "
            "written; please report this as a gptkit bug"
        )
    result.tokenizer_tokens = len(expected)


def _left_padded_batch(block_size: int, n_vocab: int) -> tuple[torch.Tensor, ...]:
    """Two rows of random ids, the second left-padded by a third: (ids, mask, position_ids)."""
    length = min(block_size, 16)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, n_vocab, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, : length // 3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars or load reports from transformers on the user's screen."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def is_gptkit_export(directory: Path) -> bool:
    """Whether gptkit may replace ``directory``: a previous Hugging Face export of ours, whose
    config.json names gptkit. Never a training checkpoint or someone else's model."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and MARKER in config


def _write_json(path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def check_target(target: Path) -> None:
    """Fail before any work when ``target`` cannot become (or replace) a Hugging Face export."""
    check_output_dir(target, is_ours=is_gptkit_export, kind="Hugging Face")
