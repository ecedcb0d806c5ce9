"""What :func:`gpt_core.train.train` reports: the :class:`Event`s a callback receives during a run,
and the :class:`TrainResult` it returns.

This module imports no PyTorch, so a display (such as ``gptkit train``'s progress bar) can name
these types without loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from gpt_core.model import GPT
    from runtime.tokenizer import Tokenizer


@dataclass
class Event:
    """Something a progress display may want to show.

    kind: "replan" (old_end, new_end, lr: a resumed run goes on to another end; before "start"),
    "start" (params, device, tokens, vocab, steps_per_epoch, world_size), "step" (loss, lr,
    grad_norm, tokens_per_s, epoch), "eval" (the step's fields plus val_loss, val_bpc, sample,
    best), "checkpoint" (path, best), "interrupted" (run_dir), "done" (plot: path or None).
    """

    kind: str
    step: int
    total_steps: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float  # nats per token
    best_val_bpc: float  # bits per character of raw text, comparable across tokenizers
    interrupted: bool
    seconds: float  # training time, summed over resumed sessions
    model: GPT  # the model after the last step (on its training device)
    tokenizer: Tokenizer
    rank: int = 0  # under torchrun, only rank 0 should report


Callback = Callable[[Event], None]
