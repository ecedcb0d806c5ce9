"""`gptkit train`: train a GPT from scratch (or fine-tune one) and save checkpoints.

The defaults and choices shown in ``--help`` are read from the library (TrainConfig's fields and
the constants of the torch-free ``gpt_core.train_config`` and ``gpt_core.config``), never copied.
Flags left out stay ``None`` here, so the library can tell what was asked for from its defaults.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from gpt_core.config import INIT_SCHEMES, PRESETS, GPTConfig
from gpt_core.train_config import (
    DEFAULT_MAX_STEPS,
    DEFAULT_PRESET,
    DEFAULT_RUN_DIR,
    LR_SCHEDULES,
    MUON_LR_RATIO,
    OPTIMIZERS,
    PRECISIONS,
    TRACKERS,
    TRAIN_DEVICES,
    TrainConfig,
)
from gpt_core.train_events import Event
from runtime.errors import ConfigError, require

# TrainConfig's defaults: what a run uses for a flag that is not given.
DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(TrainConfig)
    if f.default is not dataclasses.MISSING
}


def _help(text: str, default: object) -> str:
    """An option's help with its default, as click shows one (click would parenthesise it)."""
    return f"{text}  [default: {default}]"


@click.command("train")
@click.option(
    "--data",
    multiple=True,
    type=click.Path(),
    help="Text file or directory of .txt files (repeatable). Default: bundled Tiny Shakespeare.",
)
@click.option(
    "--out",
    help=_help(
        f"Run directory (checkpoints, metrics); `gptkit export` looks in {DEFAULT_RUN_DIR}.",
        DEFAULTS["out_dir"],
    ),
)
@click.option(
    "--preset",
    help=_help(
        f"Model shape: {', '.join(PRESETS)} (flags below change single fields).", DEFAULT_PRESET
    ),
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(),
    help="JSON file with model and/or training fields.",
)
@click.option("--n-layer", type=int, help="Number of transformer blocks.")
@click.option("--n-head", type=int, help="Attention heads per block.")
@click.option("--n-embd", type=int, help="Embedding width (divisible by --n-head).")
@click.option("--block-size", type=int, help="Context length in tokens.")
@click.option("--dropout", type=float, help="Dropout probability (default: the preset's).")
@click.option(
    "--init",
    "init_scheme",
    type=click.Choice(INIT_SCHEMES),
    help=_help("Weight init scheme.", PRESETS[DEFAULT_PRESET].init),
)
@click.option(
    "--batch-size",
    type=int,
    help=_help("Sequences per micro-batch.", DEFAULTS["batch_size"]),
)
@click.option(
    "--grad-accum",
    type=int,
    help=_help("Micro-batches per step.", DEFAULTS["grad_accum"]),
)
@click.option("--lr", type=float, help=_help("Peak learning rate (AdamW's).", DEFAULTS["lr"]))
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    help=_help("muon: Muon for the blocks' matrices, AdamW for the rest.", DEFAULTS["optimizer"]),
)
@click.option(
    "--muon-lr", type=float, help=_help("Muon's peak learning rate.", f"{MUON_LR_RATIO:g} x --lr")
)
@click.option(
    "--lr-schedule",
    type=click.Choice(LR_SCHEDULES),
    help=_help(
        "cosine decay, or wsd: warmup, stable, then a linear decay over the last "
        "decay_fraction of the run.",
        DEFAULTS["lr_schedule"],
    ),
)
@click.option("--epochs", type=float, help="Train for this many passes over the data.")
@click.option(
    "--max-steps",
    type=int,
    help=_help("Train for this many optimizer steps.", f"{DEFAULT_MAX_STEPS}, without --epochs"),
)
@click.option(
    "--eval-interval",
    type=int,
    help=_help("Evaluate, sample and checkpoint every N steps.", DEFAULTS["eval_interval"]),
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    help=_help(
        "auto: bf16 on CUDA (fp16 without bf16) and on CPUs with native bf16 (AVX512-BF16, "
        "AMX), else fp32; a resumed run keeps its own.",
        DEFAULTS["precision"],
    ),
)
@click.option(
    "--device",
    help=_help(
        f"{', '.join(TRAIN_DEVICES)} (auto picks cuda, then mps, then cpu).", DEFAULTS["device"]
    ),
)
@click.option("--compile", "use_compile", is_flag=True, help="Use torch.compile.")
@click.option(
    "--seed",
    type=int,
    help=_help("Random seed (training is deterministic on CPU).", DEFAULTS["seed"]),
)
@click.option(
    "--tokenizer",
    help=_help(
        "bpe (trained on the data), gpt2, or a saved tokenizer path.", DEFAULTS["tokenizer"]
    ),
)
@click.option(
    "--vocab-size",
    type=int,
    help=_help("Vocabulary size for --tokenizer bpe.", DEFAULTS["vocab_size"]),
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out exactly where it stopped (a larger --max-steps or --epochs "
    "trains a finished run further).",
)
@click.option(
    "--init-from",
    type=click.Path(),
    help="Start from a gptkit checkpoint or a local Hugging Face GPT-2 directory (its shape; "
    "--dropout may change).",
)
@click.option(
    "--log",
    "tracker",
    type=click.Choice(TRACKERS),
    help="Also log metrics and samples for TensorBoard, in --out (pip install "
    "'gptkit[tensorboard]').",
)
def train_command(
    data: tuple[str, ...] = (),
    out: str | None = None,
    preset: str | None = None,
    config_file: str | None = None,
    n_layer: int | None = None,
    n_head: int | None = None,
    n_embd: int | None = None,
    block_size: int | None = None,
    dropout: float | None = None,
    init_scheme: str | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    muon_lr: float | None = None,
    lr_schedule: str | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    eval_interval: int | None = None,
    precision: str | None = None,
    device: str | None = None,
    use_compile: bool = False,
    seed: int | None = None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    resume: bool = False,
    init_from: str | None = None,
    tracker: str | None = None,
) -> None:
    """Train a GPT on your text (default: the bundled Tiny Shakespeare).

    Prints progress, validation loss and bits per character, and a sample at every evaluation;
    saves checkpoints to --out (best/ and last/). Ctrl-C saves a checkpoint you can --resume.
    """
    require("torch", extra="train", purpose="gptkit train")
    from gpt_core.train import train

    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    file_model, file_train = _read_config_file(config_file, model_fields, train_fields)
    # Flags given on the command line win over the config file, which wins over the defaults.
    cli_model = {
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "block_size": block_size,
        "dropout": dropout,
        "init": init_scheme,
    }
    cli_train = {
        "data": list(data) or None,
        "out_dir": out,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "optimizer": optimizer,
        "muon_lr": muon_lr,
        "lr_schedule": lr_schedule,
        "epochs": epochs,
        "max_steps": max_steps,
        "eval_interval": eval_interval,
        "precision": precision,
        "device": device,
        "compile": use_compile or None,
        "seed": seed,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "log": tracker,
    }
    model_overrides = {**file_model, **{k: v for k, v in cli_model.items() if v is not None}}
    train_overrides = {**file_train, **{k: v for k, v in cli_train.items() if v is not None}}
    if isinstance(train_overrides.get("data"), str):
        train_overrides["data"] = [train_overrides["data"]]
    config = TrainConfig(**train_overrides)
    config.validate()
    out = config.out_dir
    # A resumed run's flags, and those of a run started from another model, are checked against
    # that model by the library; a new run is built on the preset.
    base = init_from if init_from is not None else (out if resume else None)
    model_config = _model_config(preset, model_overrides, base, resume=init_from is None)

    display = _Display()
    try:
        result = train(model_config, config, callback=display, resume=resume, init_from=init_from)
    finally:
        display.close()
    if result.rank != 0:  # under torchrun, rank 0 reports
        raise SystemExit(130 if result.interrupted else 0)
    if result.interrupted:
        click.echo(
            f"Interrupted at step {result.step}; checkpoint saved in {Path(out) / 'last'}. "
            f"Resume with: gptkit train --out {out} --resume",
            err=True,
        )
        raise SystemExit(130)
    export = (
        "gptkit export" if Path(out) == DEFAULT_RUN_DIR else f"gptkit export --checkpoint {out}"
    )
    click.echo(
        f"Saved to {Path(out) / 'best'} (last step: {Path(out) / 'last'}); validation "
        f"{result.best_val_bpc:.3f} bits/char (loss {result.best_val_loss:.3f}), "
        f"{result.step} steps in {result.seconds / 60:.1f} min. Next: {export}",
        err=True,
    )


def _model_config(
    preset: str | None, overrides: dict[str, Any], base: str | None, *, resume: bool
) -> GPTConfig | None:
    """The model shape the flags ask for: the preset (``DEFAULT_PRESET`` when not given) with
    single fields changed. For a run built on another model (``base``: the run to resume, or
    the ``--init-from`` source) without ``--preset``, that model's shape with the flags' fields
    changed, or ``None`` (that shape) when no shape flag was given.

    ``train()`` refuses a shape that is not the base's, so ``--resume --n-embd 128`` names n_embd.
    """
    if base is None or preset is not None:
        return GPTConfig.preset(preset or DEFAULT_PRESET, **overrides)
    if not overrides:
        return None
    from gpt_core.checkpoint import read_config
    from gpt_core.train_setup import init_from_config, last_checkpoint

    if not resume:
        return init_from_config(base).replace(**overrides)
    saved = read_config(last_checkpoint(Path(base))).get("model", {})
    return GPTConfig.from_dict(saved).replace(**overrides)


def _read_config_file(
    path: str | None, model_fields: set[str], train_fields: set[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a JSON config (flat, or with "model"/"train" objects) into model and train fields."""
    if path is None:
        return {}, {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    for section in ("model", "train"):
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f'config file {path}: "{section}" must be a JSON object of fields')
    flat = {**data.pop("model", {}), **data.pop("train", {}), **data}
    unknown = set(flat) - model_fields - train_fields
    if unknown:
        raise ConfigError(f"config file {path} has unknown key(s): {', '.join(sorted(unknown))}")
    model = {k: v for k, v in flat.items() if k in model_fields}
    train = {k: v for k, v in flat.items() if k in train_fields}
    return model, train


def _minutes(seconds: float) -> str:
    """Elapsed training time as m:ss."""
    whole = round(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


class _Display:
    """Turns training events into a tqdm bar and log lines on stderr."""

    def __init__(self) -> None:
        self.bar: Any = None  # a tqdm bar once the run starts

    def __call__(self, event: Event) -> None:
        from tqdm import tqdm

        if event.kind == "start":
            d = event.data
            ranks = f" x {d['world_size']} processes" if d["world_size"] > 1 else ""
            click.echo(
                f"Training {d['params'] / 1e6:.2f}M parameters on {d['device']}{ranks} "
                f"({d['precision']}; {d['tokens']:,} training tokens, vocab {d['vocab']:,}, "
                f"{d['steps_per_epoch']} steps per epoch)",
                err=True,
            )
            self.bar = tqdm(
                total=event.total_steps,
                initial=event.step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        elif event.kind == "step" and self.bar is not None:
            d = event.data
            self.bar.set_postfix(
                loss=f"{d['loss']:.3f}", lr=f"{d['lr']:.2e}", tok_s=f"{d['tokens_per_s']:,.0f}"
            )
            self.bar.update(1)
        elif event.kind == "replan":
            d = event.data
            self._write(
                f"Continuing the run from step {event.step} to step {d['new_end']} (it was to end "
                f"at {d['old_end']}): learning rate re-planned from {d['lr']:.2e} down to the "
                "floor at the new end"
            )
        elif event.kind == "eval":
            d = event.data
            best = " (best)" if d["best"] else ""
            line = (
                f"step {event.step}: train loss {d['loss']:.3f}, val loss {d['val_loss']:.3f}, "
                f"val {d['val_bpc']:.3f} bits/char{best} at {_minutes(d['elapsed_s'])}"
            )
            sample = d["sample"].strip("\n")
            self._write(f"{line}\n--- sample ---\n{sample}\n--------------")
        elif event.kind == "done":
            plot = event.data.get("plot")
            self._write(
                f"Loss curve: {plot}"
                if plot
                else "Loss curve skipped: install matplotlib (pip install 'gptkit[plot]')"
            )

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            click.echo(text, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
