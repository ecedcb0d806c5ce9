"""Checkpoints: safetensors weights, JSON config, tokenizer files, and (for resuming) training state.

A run directory looks like this::

    runs/default/
      metrics.jsonl          one JSON object per log line (step, loss, val loss, bits/char, ...)
      loss.png               the loss curve (when matplotlib is installed)
      best -> step-000900/   the checkpoint with the lowest validation loss
      last -> step-001200/   the most recent checkpoint (has state.pt for --resume)
      step-000900/ model.safetensors  config.json  tokenizer.json  tokenizer.tiktoken
      step-001200/ ...       + state.pt (optimizer, step, RNG states; loaded with weights_only)

Every checkpoint is written into a fresh directory, and ``best``/``last`` are symlinks swapped
atomically afterwards, so killing the process at any moment leaves the previous checkpoint loadable.
Nothing here unpickles arbitrary objects: weights are safetensors, config is JSON, and the training
state is loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gpt_core.config import GPTConfig
from gpt_core.model import GPT
from gpt_core.train_config import DEFAULT_RUN_DIR
from runtime.errors import CheckpointError, GptkitError
from runtime.files import atomic_write_bytes
from runtime.tokenizer import META_FILENAME, Tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
_TIED_KEY = "lm_head.weight"  # the output head is the token embedding: stored once


def save_model(
    directory: str | os.PathLike[str],
    model: GPT,
    tokenizer: Tokenizer,
    *,
    train_config: dict[str, Any] | None = None,
) -> Path:
    """Write weights, config and tokenizer into ``directory`` (created; files written atomically)."""
    from safetensors.torch import save as safetensors_bytes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model_state_dict(model).items()}
    atomic_write_bytes(
        directory / WEIGHTS_FILE, safetensors_bytes(weights, metadata={"format": "pt"})
    )
    config = {"model": model.config.to_dict(), "train": train_config or {}}
    atomic_write_bytes(directory / CONFIG_FILE, json.dumps(config, indent=2).encode())
    tokenizer.save(directory)
    return directory


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the tied head and without torch.compile/DDP prefixes."""
    state = {}
    for key, value in model.state_dict().items():
        key = _strip_prefixes(key)
        if key != _TIED_KEY:
            state[key] = value
    return state


def load_model(
    path: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer]:
    """Load a model and its tokenizer from a run directory (its best, else last) or a checkpoint.

    ``None`` means DEFAULT_RUN_DIR. A local Hugging Face GPT-2 directory loads too (through
    ``gpt_core.hf.load_hf_gpt2``). Any problem is one CheckpointError line naming the file.
    """
    checkpoint = resolve_checkpoint(path)
    config = read_config(checkpoint)
    if "model_type" in config:  # a Hugging Face directory, not ours
        from gpt_core.hf import load_hf_gpt2

        model, tokenizer = load_hf_gpt2(checkpoint)
        return model.to(device).eval(), tokenizer
    try:
        model_config = GPTConfig.from_dict(config.get("model", {}))
    except GptkitError as e:
        raise CheckpointError(f"{checkpoint / CONFIG_FILE}: {e}") from None
    model = GPT(model_config)
    load_weights(model, checkpoint / WEIGHTS_FILE)
    tokenizer = read_tokenizer(checkpoint)
    if tokenizer.n_vocab > model_config.vocab_size:
        raise CheckpointError(
            f"{checkpoint}: tokenizer has {tokenizer.n_vocab} ids but the model only "
            f"{model_config.vocab_size}; the checkpoint's files do not belong together"
        )
    return model.to(device).eval(), tokenizer


def resolve_checkpoint(path: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint directory that ``path`` means: itself, or a run directory's best/last."""
    path = Path(path) if path is not None else DEFAULT_RUN_DIR
    if not path.exists():
        hint = "train one with `gptkit train`" if path == DEFAULT_RUN_DIR else "check the path"
        raise CheckpointError(f"no checkpoint at {path}; {hint}")
    if (path / WEIGHTS_FILE).exists() or (path / CONFIG_FILE).exists():
        return path
    for name in ("best", "last"):
        if (path / name / WEIGHTS_FILE).exists():
            return (path / name).resolve()
    raise CheckpointError(
        f"{path} holds no checkpoint ({WEIGHTS_FILE} not found in it or in best/ or last/); "
        "train one with `gptkit train`"
    )


def read_config(checkpoint: Path) -> dict[str, Any]:
    config_path = checkpoint / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{config_path} is missing; the checkpoint is incomplete") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{config_path} is not valid JSON ({e}); the file is corrupt"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    return config


def read_tokenizer(checkpoint: Path) -> Tokenizer:
    if not (checkpoint / META_FILENAME).exists():
        raise CheckpointError(
            f"{checkpoint / META_FILENAME} is missing; the checkpoint is incomplete"
        )
    try:
        return Tokenizer.load(checkpoint)
    except GptkitError as e:
        raise CheckpointError(f"{checkpoint}: {e}") from None


def load_weights(model: GPT, weights_path: Path) -> None:
    """Load safetensors weights into ``model``, with one-line errors for corrupt or mismatched files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights_path.exists():
        raise CheckpointError(f"{weights_path} is missing; the checkpoint is incomplete")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is corrupt or truncated ({e})") from None
    state = {_strip_prefixes(k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - {_TIED_KEY})
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match its config: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{weights_path} does not match its config: {key} has shape "
                f"{tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: GPT,
    tokenizer: Tokenizer,
    *,
    train_config: dict[str, Any],
    state: dict[str, Any] | None,
    is_best: bool,
) -> Path:
    """Write ``run_dir/step-NNNNNN/`` completely, then point ``last`` (and ``best``) at it.

    Older step directories that neither link points to are removed afterwards.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    suffix = 1
    while (run_dir / name).exists():  # the same step saved again (e.g. after a resume)
        name, suffix = f"step-{step:06d}-{suffix}", suffix + 1
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model, tokenizer, train_config=train_config)
    if state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(tmp / STATE_FILE, buffer.getvalue())
    os.replace(tmp, final)
    _point(run_dir / "last", name)
    if is_best or not (run_dir / "best").exists():
        _point(run_dir / "best", name)
    _remove_unreferenced(run_dir)
    return final


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG state saved beside a checkpoint (tensors and plain types only)."""
    state_path = checkpoint / STATE_FILE
    if not state_path.exists():
        raise CheckpointError(
            f"{checkpoint} has no training state ({STATE_FILE}); resume from the run's last/ "
            "checkpoint, or start a new run with --init-from to fine-tune"
        )
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(
            f"{state_path} is corrupt or truncated ({type(e).__name__})"
        ) from None


def _point(link: Path, target: str) -> None:
    """Atomically make ``link`` a symlink to ``target`` (a sibling directory name).

    Where symlinks are not allowed (Windows without developer mode), ``link`` becomes a copy,
    swapped in by two renames.
    """
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.symlink(target, tmp, target_is_directory=True)
    except OSError:
        shutil.copytree(link.parent / target, tmp)
        old = link.with_name(f".{link.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if link.exists():
            os.replace(link, old)
        os.replace(tmp, link)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, link)


def _remove_unreferenced(run_dir: Path) -> None:
    keep = {os.readlink(run_dir / n) for n in ("best", "last") if (run_dir / n).is_symlink()}
    for child in run_dir.glob("step-*"):
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)


def _strip_prefixes(key: str) -> str:
    """``module._orig_mod.x`` -> ``x``: DDP and torch.compile wrappers, in any order."""
    stripped = None
    while stripped != key:
        stripped = key
        for prefix in ("_orig_mod.", "module."):
            key = key.removeprefix(prefix)
    return key
