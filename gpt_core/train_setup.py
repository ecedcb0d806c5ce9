"""The pieces :func:`gpt_core.train.train` sets a run up with and measures it by: the tokenizer,
the model a run starts from (``init_from``), the checkpoint a resume continues, and the
validation loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.nn import functional as F

from gpt_core import schedule
from gpt_core.checkpoint import load_model, read_config, resolve_checkpoint
from gpt_core.config import GPTConfig
from gpt_core.dataset import CustomDataset, read_text
from gpt_core.model import GPT, CausalSelfAttention
from runtime.errors import CheckpointError, ConfigError, GptkitError
from runtime.tokenizer import Tokenizer

# The fields of GPTConfig that give a model's weights their shapes: a model started from another
# (init_from) keeps them. dropout may change (fine-tuning often wants another); init is unused
# (the weights come from the source); vocab_size is the source tokenizer's.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias")


def build_tokenizer(spec: str, files: list[Path], vocab_size: int) -> Tokenizer:
    """``bpe`` (trained on the data), ``gpt2`` (tiktoken's), or a saved tokenizer's path."""
    if spec == "bpe":
        from gpt_core.bpe import train_bpe

        # 20 MB of text is plenty to learn a few thousand merges and bounds the cost on big corpora.
        return train_bpe([read_text(files, limit=20_000_000)], vocab_size, name=f"bpe-{vocab_size}")
    if spec == "gpt2":
        return Tokenizer.gpt2()
    if Path(spec).exists():
        return Tokenizer.load(spec)
    raise ConfigError(
        f"unknown tokenizer {spec!r}; use bpe, gpt2, or the path of a saved tokenizer"
    )


@torch.no_grad()
def estimate_loss(
    model: GPT,
    dataset: CustomDataset,
    max_windows: int,
    batch_size: int,
    token_chars: torch.Tensor,
    precision: str,
    device: torch.device,
) -> tuple[float, int, int]:
    """(summed cross-entropy in nats, tokens, characters) over fixed validation windows.

    The same windows every time, so evaluations are comparable; characters are counted exactly
    from the target tokens, so bits/char = nats / ln 2 / characters.
    """
    was_training = model.training
    model.eval()
    starts = dataset.eval_starts(max_windows)
    nats, n_tokens, n_chars = 0.0, 0, 0
    for i in range(0, len(starts), batch_size):
        x, y = dataset.batch(starts[i : i + batch_size])
        with schedule.autocast(precision, device):
            logits = model(x.to(device)).logits
        nats += F.cross_entropy(
            logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"
        ).item()
        n_tokens += y.numel()
        n_chars += int(token_chars[y].sum())
    model.train(was_training)
    return nats, n_tokens, n_chars


def last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from (a one-line error when there is none)."""
    if not (run_dir / "last").exists():
        raise CheckpointError(
            f"nothing to resume in {run_dir} (no last/ checkpoint); "
            "start a new run without --resume, or pass the run's --out"
        )
    return resolve_checkpoint(run_dir / "last")


def init_from_config(source: str | os.PathLike[str]) -> GPTConfig:
    """The model shape of an ``init_from`` source, read from its config alone (no weights)."""
    checkpoint = resolve_checkpoint(source)
    config = read_config(checkpoint)
    if "model_type" in config:  # a Hugging Face directory
        from gpt_core.hf import hf_config

        return hf_config(checkpoint)
    try:
        return GPTConfig.from_dict(config.get("model", {}))
    except GptkitError as e:
        raise CheckpointError(f"{checkpoint}: {e}") from None


def load_init_from(
    source: str | os.PathLike[str], model_config: GPTConfig | None
) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a gptkit checkpoint or run directory, or of a local Hugging Face
    GPT-2 directory, for a new run to start from.

    A given ``model_config`` must have the source's shape (SHAPE_FIELDS: a one-line ConfigError
    naming the first field that differs); its dropout replaces the source's.
    """
    directory = Path(source)
    try:
        hf = "model_type" in json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        hf = False
    if hf:
        from gpt_core.hf import load_hf_gpt2

        model, tokenizer = load_hf_gpt2(directory)
    else:
        model, tokenizer = load_model(directory)
    if model_config is not None:
        for key in SHAPE_FIELDS:
            have, asked = getattr(model.config, key), getattr(model_config, key)
            if have != asked:
                flag = f"--{key.replace('_', '-')}"
                raise ConfigError(
                    f"--init-from {source} has {key} {have}, not {asked}; a model started from "
                    f"another keeps its shape (drop {flag}, or train a new model without "
                    "--init-from)"
                )
        set_dropout(model, model_config.dropout)
    return model, tokenizer


def set_dropout(model: GPT, p: float) -> None:
    """Change a built model's dropout probability everywhere it is used."""
    model.config = model.config.replace(dropout=p)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        elif isinstance(module, CausalSelfAttention):
            module.dropout = p  # passed to scaled_dot_product_attention
