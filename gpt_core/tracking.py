"""Experiment tracking beside ``metrics.jsonl``: ``TrainConfig.log = "tensorboard"``.

TensorBoard event files go into the run directory itself, so ``tensorboard --logdir runs`` shows
every run under its directory's name. Each row of ``metrics.jsonl`` becomes scalars (train/loss,
train/lr, train/tokens_per_s, train/grad_norm; at evaluations val/loss and val/bits_per_char)
and each evaluation's sample becomes text (``samples``). A resumed run first hides what was
logged after the checkpoint it resumes from (the writer's ``purge_step``), as metrics.jsonl
drops those rows, so no step appears twice.

The writer is PyTorch's ``torch.utils.tensorboard.SummaryWriter``, which needs the
``tensorboard`` package: the optional extra ``gptkit[tensorboard]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from runtime.errors import require

# metrics.jsonl's fields and the TensorBoard tags they are written under.
SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "tokens_per_s": "train/tokens_per_s",
    "grad_norm": "train/grad_norm",
    "val_loss": "val/loss",
    "val_bpc": "val/bits_per_char",
}
SAMPLE_TAG = "samples"


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def sample(self, step: int, text: str) -> None: ...
    def close(self) -> None: ...


def check_tracker(name: str | None) -> None:
    """A one-line MissingDependencyError, before any work, when the tracker's package is absent."""
    if name == "tensorboard":
        require("tensorboard", extra="tensorboard", purpose="--log tensorboard")


def open_tracker(name: str | None, run_dir: Path, *, resumed_at: int) -> Tracker | None:
    """The tracker ``name`` writing into ``run_dir`` (None: no tracker); ``resumed_at`` is the step
    the run continues from (0 for a new run)."""
    if name is None:
        return None
    check_tracker(name)
    return TensorBoardTracker(run_dir, purge_step=resumed_at + 1 if resumed_at else None)


class TensorBoardTracker:
    def __init__(self, run_dir: Path, *, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        for key, tag in SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["step"])

    def sample(self, step: int, text: str) -> None:
        # TensorBoard renders text as Markdown: a code block keeps the sample's line breaks.
        self.writer.add_text(SAMPLE_TAG, f"```\n{text}\n```", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
