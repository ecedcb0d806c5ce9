"""TrainConfig: every training setting except the model's shape (that is GPTConfig), validated.

The same fields come from the Python API, from ``gptkit train`` flags and from a ``--config`` JSON
file, so validation gives one-line errors for wrong types as well as wrong values. A checkpoint's
``config.json`` stores them under "train".

This module imports no PyTorch: the command line reads its defaults and choices from here (and
from ``gpt_core.config``) while ``gptkit --help`` stays instant, and the resume rule lives here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from gpt_core.config import GPTConfig

# Where a run is written when no out_dir is given, and where `gptkit export` looks for one.
DEFAULT_RUN_DIR = Path("runs") / "default"
# The model shape of a new run when the caller gives none (a GPTConfig preset name): small enough
# to train on a laptop CPU while you watch.
DEFAULT_PRESET = "small-cpu"
# The length of a run that sets neither max_steps nor epochs: enough for the default preset to
# write recognisable text on the bundled corpus, short enough to wait for on a CPU (about 9-10
# minutes on two cores with the default recipe: benchmarks/TRAINING.md).
DEFAULT_MAX_STEPS = 550
# Values of TrainConfig.device and TrainConfig.precision (gpt_core.schedule resolves "auto").
TRAIN_DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Values of TrainConfig.optimizer and TrainConfig.lr_schedule (gpt_core.schedule builds them).
OPTIMIZERS = ("adamw", "muon")
# muon_lr when none is given, as a multiple of lr (0.006 for the default 2e-3: the best measured).
MUON_LR_RATIO = 3.0
LR_SCHEDULES = ("cosine", "wsd")
# Values of TrainConfig.log: where metrics go besides metrics.jsonl (gpt_core.tracking).
TRACKERS = ("tensorboard",)


@dataclass
class TrainConfig:
    """Everything about a run except the model's shape (that is GPTConfig).

    The defaults are ``gptkit train``'s: the ``DEFAULT_PRESET`` model on the bundled Tiny
    Shakespeare, with a BPE learned from the data, sized to train on a CPU.
    """

    data: list[str] = field(default_factory=list)  # files or directories; empty = bundled corpus
    out_dir: str = str(DEFAULT_RUN_DIR)
    tokenizer: str = "bpe"  # "bpe" (trained on the data), "gpt2", or a saved tokenizer path
    vocab_size: int = 2048  # for "bpe": small vocabularies train fastest on a CPU
    batch_size: int = 32  # sequences per micro-batch (over all DDP ranks)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3  # peak learning rate (AdamW's); small models take a large one
    # Muon for the blocks' matrices reaches the 600-step AdamW run's loss in about half the steps
    # (benchmarks/TRAINING.md); "adamw" is the recipe before it.
    optimizer: str = "muon"  # one of OPTIMIZERS
    # Muon's peak rate (scaled per matrix to AdamW's update size); None = MUON_LR_RATIO x lr, so
    # a smaller --lr (fine-tuning) lowers both.
    muon_lr: float | None = None
    lr_schedule: str = "cosine"  # one of LR_SCHEDULES
    decay_fraction: float = 0.3  # "wsd": the last fraction of the run decays linearly
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99  # 0.95 is for long runs; a short run wants the smoother estimate
    grad_clip: float = 1.0
    epochs: float | None = None  # one epoch = every training window once
    max_steps: int | None = None  # wins over epochs; neither given = DEFAULT_MAX_STEPS
    eval_interval: int = 100  # evaluate, sample and checkpoint every N steps
    eval_windows: int = 512  # validation windows per evaluation (spread over the split)
    log_interval: int = 10  # train-loss rows in metrics.jsonl every N steps
    sample_tokens: int = 100
    sample_prompt: str = "\n"
    val_fraction: float = 0.1
    precision: str = "auto"  # one of PRECISIONS
    device: str = "auto"  # one of TRAIN_DEVICES
    compile: bool = False
    seed: int = 1337
    threads: int | None = None  # torch CPU threads; None = PyTorch's default (one per core)
    log: str | None = None  # also log to one of TRACKERS (metrics.jsonl is always written)

    @property
    def muon_peak_lr(self) -> float:
        """Muon's peak rate: muon_lr, or MUON_LR_RATIO x lr when it is not given."""
        return self.muon_lr if self.muon_lr is not None else MUON_LR_RATIO * self.lr

    def validate(self) -> None:
        """One-line ConfigErrors for wrong types and out-of-range values (from flags or JSON)."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), str(f.type))
        positive = ("vocab_size", "batch_size", "grad_accum", "eval_interval", "eval_windows")
        for name in (*positive, "log_interval", "sample_tokens", "warmup_steps", "seed"):
            value = getattr(self, name)
            if value < 0 or (value == 0 and name in positive):
                kind = "positive" if name in positive else "zero or more"
                raise ConfigError(f"--{name.replace('_', '-')} must be {kind}, got {value}")
        for name in ("lr", "muon_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(
                f"--decay-fraction must be between 0 and 1, got {self.decay_fraction}"
            )
        for name, choices in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; "
                    f"choose one of {', '.join(choices)}"
                )
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"--max-steps must be positive, got {self.max_steps}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        for name in ("min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        if self.log is not None and self.log not in TRACKERS:
            raise ConfigError(f"unknown --log {self.log!r}; choose one of {', '.join(TRACKERS)}")


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Check ``value`` against a TrainConfig annotation such as "int", "float | None", "list[str]"."""
    if value is None and annotation.endswith("| None"):
        return
    kind = annotation.removesuffix(" | None")
    if kind == "int":
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        wanted = "a number"
    elif kind == "bool":
        ok, wanted = isinstance(value, bool), "true or false"
    elif kind == "str":
        ok, wanted = isinstance(value, str), "a string"
    else:  # list[str]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        wanted = "a list of paths"
    if not ok:
        raise ConfigError(f"training field {name} must be {wanted}, got {value!r}")


# The fields a resumed run takes from its checkpoint rather than from the caller: everything that
# decides which batches come next and what the optimizer does with them.
RESUME_FIXED = (
    "data tokenizer vocab_size batch_size grad_accum lr optimizer muon_lr lr_schedule "
    "decay_fraction min_lr_ratio warmup_steps weight_decay beta1 beta2 grad_clip epochs max_steps "
    "val_fraction seed eval_interval eval_windows"
).split()
# RESUME_FIXED fields a run saved before they existed, with the value such a run used: a resumed
# old run keeps its recipe even where today's default differs.
BEFORE_RECIPE_FIELDS = {
    "optimizer": "adamw",
    "muon_lr": None,
    "lr_schedule": "cosine",
    "decay_fraction": 0.3,
}
# The length of such a run when it set neither max_steps nor epochs (DEFAULT_MAX_STEPS then).
BEFORE_RECIPE_MAX_STEPS = 600


def saved_recipe(saved_train: Mapping[str, Any]) -> dict[str, Any]:
    """A saved run's training fields, with what a run saved before the recipe fields ran with."""
    if "optimizer" in saved_train:
        return dict(saved_train)
    filled = {**BEFORE_RECIPE_FIELDS, **saved_train}
    if filled.get("max_steps") is None and filled.get("epochs") is None:
        filled["max_steps"] = BEFORE_RECIPE_MAX_STEPS
    return filled


# The RESUME_FIXED fields that set the run's length. Asking a resumed run for another length is
# no conflict: it continues to the new end with its learning-rate schedule re-planned
# (``gpt_core.schedule.replan``); an end at or before the run's current step is refused by train().
RESUME_LENGTH = ("max_steps", "epochs")


def check_resume(
    run_dir: Path,
    saved_model: Mapping[str, Any],
    saved_train: Mapping[str, Any],
    model_config: GPTConfig | None,
    config: TrainConfig,
) -> dict[str, Any]:
    """The resume rule: a resumed run keeps its shape and recipe; asking for another is an error.

    ``saved_model``/``saved_train`` are the run's saved fields. What the caller asks for is the
    whole of ``model_config`` when given (but vocab_size, which the tokenizer sets), and each
    RESUME_FIXED field of ``config`` whose value is not the TrainConfig default; a field left at
    its default takes the run's value. The first disagreement is a one-line ConfigError naming
    the field, the run's value and the asked one. The length (RESUME_LENGTH) is the exception:
    returns the RESUME_FIXED values the resumed run takes: the run's, except that a length that
    differs from the run's is taken from ``config`` (both of its fields, as asked).
    """
    saved_train = saved_recipe(saved_train)
    asked_model = {} if model_config is None else model_config.to_dict()
    asked_model.pop("vocab_size", None)
    defaults = TrainConfig()
    asked_train = {
        name: getattr(config, name)
        for name in RESUME_FIXED
        if getattr(config, name) != getattr(defaults, name)
    }
    extends = any(saved_train.get(k) != v for k, v in asked_train.items() if k in RESUME_LENGTH)
    for saved, asked in ((saved_model, asked_model), (saved_train, asked_train)):
        for key, value in asked.items():
            if key in saved and saved[key] != value and key not in RESUME_LENGTH:
                raise ConfigError(
                    f"the run in {run_dir} has {key} {saved[key]}, not {value}; --resume "
                    f"keeps the run's settings (drop the flag, or start a new run with "
                    f"--init-from {run_dir})"
                )
    kept = {k: saved_train[k] for k in RESUME_FIXED if k in saved_train}
    if extends:
        kept.update({k: getattr(config, k) for k in RESUME_LENGTH})
    return kept
