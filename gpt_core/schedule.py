"""The training recipe: device and threads, precision, AdamW groups, the learning-rate schedule.

Kept apart from the loop in ``gpt_core.train`` so each piece can be read (and tested) alone.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch

from gpt_core.distributed import Distributed
from gpt_core.train_config import PRECISIONS, TRAIN_DEVICES
from runtime.errors import ConfigError


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable choice is a one-line error."""
    if name not in TRAIN_DEVICES:
        raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(TRAIN_DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but PyTorch sees no CUDA GPU; use cpu")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but is not available here; use cpu")
    return torch.device(name)


def set_threads(threads: int | None, dist: Distributed) -> None:
    """Set torch's CPU threads; by default several ranks on one CPU split its cores between them.

    Left alone, every rank would start one thread per core and oversubscribe the machine.
    """
    if threads is None and dist.enabled and not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 1) // dist.local_world_size)  # ranks on this machine
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` = bf16 on CUDA (fp16 on GPUs without bf16), fp32 elsewhere.

    bf16 autocast works on CPU too, but it is slower than fp32 on most CPUs, so it is opt-in there.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (disabled scaler)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def make_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW that decays matrices (linear weights, embeddings) but not biases or LayerNorm gains.

    Decaying a gain or a bias pulls it towards zero for no benefit (as nanoGPT and minGPT do it).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def learning_rate(
    step: int,
    total_steps: int,
    *,
    lr: float,
    warmup_steps: int,
    min_lr_ratio: float,
    restart: tuple[int, float] | None = None,
) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at the end.

    Warmup is capped at a tenth of the run, so short runs (tests, fine-tuning) still decay.
    ``restart`` is a re-planned run's ``(step, lr)`` (see :func:`replan`): from that step on, the
    cosine goes from that learning rate down to the floor at ``total_steps`` instead.
    """
    min_lr = lr * min_lr_ratio
    if restart is not None and step >= restart[0]:
        start, start_lr = restart
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return min_lr + 0.5 * (start_lr - min_lr) * (1 + math.cos(math.pi * progress))
    warmup = min(warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def replan(
    step: int,
    old_total: int,
    *,
    lr: float,
    warmup_steps: int,
    min_lr_ratio: float,
    restart: tuple[int, float] | None = None,
) -> tuple[int, float]:
    """The ``restart`` of a run whose length changes at ``step``: no jump in the learning rate.

    The step about to run keeps the rate the old plan gives it, and the new plan decays from
    there (cosine) to the floor at the new end. A finished run is already at the floor, so it
    continues there; a run stopped mid-decay stretches (or shortens) the rest of its decay.
    """
    kw: dict[str, Any] = dict(lr=lr, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    return step, learning_rate(step, old_total, restart=restart, **kw)


def total_steps(
    max_steps: int | None, epochs: float | None, steps_per_epoch: int, *, default: int
) -> int:
    """``max_steps`` when given, else ``epochs`` passes over the training windows, else default."""
    if max_steps is not None:
        return max_steps
    if epochs is not None:
        return max(1, round(epochs * steps_per_epoch))
    return default
