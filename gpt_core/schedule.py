"""The training recipe: device and threads, precision, optimizers, the learning-rate schedule.

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
    """``auto`` = bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs with native bf16 matrix
    instructions, fp32 elsewhere.

    On a CPU with AVX512-BF16 or AMX, bf16 autocast trains faster for the same validation loss
    (benchmarks/TRAINING.md); without them bf16 is emulated and slower than fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86 AVX512-BF16 or AMX tiles).

    The probes are PyTorch's own (``torch.cpu``); where they are missing, the answer is no.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (disabled scaler)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def make_optimizers(
    model: torch.nn.Module,
    *,
    optimizer: str,
    lr: float,
    muon_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
) -> list[torch.optim.Optimizer]:
    """The run's optimizers: AdamW alone, or Muon for the blocks' matrices and AdamW for the rest.

    AdamW decays matrices (linear weights, embeddings) but not biases or LayerNorm gains:
    decaying a gain or a bias pulls it towards zero for no benefit (as nanoGPT does it). Muon
    (``torch.optim.Muon``) orthogonalises the update of each hidden matrix, which trains a small
    model further per step; it is made for hidden matrices only, so the embeddings (and the head
    tied to them), biases and gains stay with AdamW. Every group keeps its peak rate in
    ``peak_lr``: :func:`set_learning_rate` scales them all by the schedule.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [
        p for n, p in params if optimizer == "muon" and p.dim() == 2 and n.startswith(_BLOCKS)
    ]
    hidden_ids = {id(p) for p in hidden}
    rest = [(n, p) for n, p in params if id(p) not in hidden_ids]
    groups = [
        {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    for group in groups:
        group["peak_lr"] = lr
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")
    ]
    if hidden:
        # match_rms_adamw scales each matrix's rate so its update has AdamW's typical size.
        muon = torch.optim.Muon(
            hidden, lr=muon_lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        muon.param_groups[0]["peak_lr"] = muon_lr
        optimizers.append(muon)
    return optimizers


# Parameter names of the transformer blocks (gpt_core.model's layout, as nanoGPT's).
_BLOCKS = "transformer.h."


def set_learning_rate(optimizers: list[torch.optim.Optimizer], fraction: float) -> None:
    """Set every group's rate to ``fraction`` of its peak (the schedule's rate / the peak lr)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * fraction


def learning_rate(
    step: int,
    total_steps: int,
    *,
    lr: float,
    warmup_steps: int,
    min_lr_ratio: float,
    restart: tuple[int, float] | None = None,
    shape: str = "cosine",
    decay_fraction: float = 0.0,
) -> float:
    """Linear warmup over ``warmup_steps``, then a decay to ``lr * min_lr_ratio`` at the end.

    ``shape`` "cosine" decays along a cosine from the end of warmup; "wsd" (warmup-stable-decay)
    holds the peak and decays linearly over the last ``decay_fraction`` of the run, which on
    short runs spends more steps at a high rate. Warmup is capped at a tenth of the run, so short
    runs (tests, fine-tuning) still decay. ``restart`` is a re-planned run's ``(step, lr)`` (see
    :func:`replan`): from that step on, the schedule starts from that rate and reaches the floor
    at ``total_steps`` instead (cosine from there, or stable then the linear decay).
    """
    min_lr = lr * min_lr_ratio
    start, start_lr = 0, lr
    if restart is not None and step >= restart[0]:
        start, start_lr = restart
    else:
        warmup = min(warmup_steps, max(1, total_steps // 10))
        if step < warmup:
            return lr * (step + 1) / warmup
        start = warmup
    if shape == "wsd":
        decay_start = max(start, total_steps - round(decay_fraction * total_steps))
        if step < decay_start:
            return start_lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return start_lr + (min_lr - start_lr) * progress
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    return min_lr + 0.5 * (start_lr - min_lr) * (1 + math.cos(math.pi * progress))


def replan(
    step: int,
    old_total: int,
    *,
    lr: float,
    warmup_steps: int,
    min_lr_ratio: float,
    restart: tuple[int, float] | None = None,
    shape: str = "cosine",
    decay_fraction: float = 0.0,
) -> tuple[int, float]:
    """The ``restart`` of a run whose length changes at ``step``: no jump in the learning rate.

    The step about to run keeps the rate the old plan gives it, and the new plan decays from
    there (cosine) to the floor at the new end. A finished run is already at the floor, so it
    continues there; a run stopped mid-decay stretches (or shortens) the rest of its decay.
    """
    kw: dict[str, Any] = dict(
        lr=lr,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        shape=shape,
        decay_fraction=decay_fraction,
    )
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
