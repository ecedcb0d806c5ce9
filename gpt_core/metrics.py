"""The run's metrics: ``metrics.jsonl`` (one JSON object per logged step) and ``loss.png``.

JSON lines survive a crash mid-write (a cut last line is skipped when read), and a resumed run
first drops the rows logged after the checkpoint it resumes from, so no step appears twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from runtime.files import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only whole rows up to ``step`` (a resume starts there; a crash may cut a line)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def write_loss_plot(metrics_path: Path, out: Path) -> str | None:
    """A PNG of the train and validation loss against steps and minutes; None (and no file)
    when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    val = [r for r in rows if "val_loss" in r]
    # Against steps (what the schedule sees) and minutes (what the user waits); rows logged
    # before elapsed_s was recorded have no minutes axis.
    axes_by = [("step", "step", 1.0)]
    if all("elapsed_s" in r for r in rows):
        axes_by.append(("elapsed_s", "minutes of training", 60.0))
    fig, axes = plt.subplots(1, len(axes_by), figsize=(6 * len(axes_by), 4), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], axes_by, strict=True):
        ax.plot([r[key] / scale for r in rows], [r["loss"] for r in rows], label="train")
        ax.plot(
            [r[key] / scale for r in val], [r["val_loss"] for r in val], "o-", label="validation"
        )
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return str(out)
