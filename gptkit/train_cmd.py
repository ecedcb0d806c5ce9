"""`gptkit train`: train a GPT from scratch (or fine-tune one) and save checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtime.errors import ConfigError, require

DEFAULT_PRESET = "small-cpu"
DEFAULT_OUT = "runs/default"  # gpt_core.checkpoint.DEFAULT_RUN_DIR, where `gptkit export` looks
DEFAULT_STEPS = 600  # gpt_core.train.DEFAULT_MAX_STEPS: about ten minutes of small-cpu on 2 cores


@click.command("train")
@click.option(
    "--data",
    multiple=True,
    type=click.Path(),
    help="Text file or directory of .txt files (repeatable). Default: bundled Tiny Shakespeare.",
)
@click.option(
    "--out",
    show_default=DEFAULT_OUT,
    help="Run directory (checkpoints, metrics); `gptkit export` looks in runs/default.",
)
@click.option(
    "--preset",
    show_default=DEFAULT_PRESET,
    help="Model shape: tiny, small-cpu, gpt2, gpt2-medium (flags below change single fields).",
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
@click.option("--dropout", type=float, help="Dropout probability.")
@click.option(
    "--init",
    "init_scheme",
    type=click.Choice(["gpt2", "neox", "xavier"]),
    help="Weight init scheme.",
)
@click.option("--batch-size", type=int, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--epochs", type=float, help="Train for this many passes over the data.")
@click.option(
    "--max-steps",
    type=int,
    help=f"Train for this many optimizer steps (default {DEFAULT_STEPS} when --epochs is not given).",
)
@click.option("--eval-interval", type=int, help="Evaluate, sample and checkpoint every N steps.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    show_default="auto",
    help="auto = bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU and MPS.",
)
@click.option("--device", show_default="auto", help="auto, cpu, cuda or mps.")
@click.option("--compile", "use_compile", is_flag=True, help="Use torch.compile.")
@click.option("--seed", type=int, help="Random seed (training is deterministic on CPU).")
@click.option(
    "--tokenizer", help="bpe (trained on the data, default), gpt2, or a saved tokenizer path."
)
@click.option("--vocab-size", type=int, help="Vocabulary size for --tokenizer bpe.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option(
    "--init-from",
    type=click.Path(),
    help="Start from a gptkit checkpoint or a local Hugging Face GPT-2 directory.",
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
) -> None:
    """Train a GPT on your text (default: the bundled Tiny Shakespeare).

    Prints progress, validation loss and bits per character, and a sample at every evaluation;
    saves checkpoints to --out (best/ and last/). Ctrl-C saves a checkpoint you can --resume.
    """
    require("torch", extra="train", purpose="gptkit train")
    import dataclasses

    from gpt_core.config import GPTConfig
    from gpt_core.train import TrainConfig, train

    if resume and init_from:
        raise click.UsageError(
            "--resume and --init-from cannot be combined: resume continues a run, init-from starts a new one"
        )
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
        "epochs": epochs,
        "max_steps": max_steps,
        "eval_interval": eval_interval,
        "precision": precision,
        "device": device,
        "compile": use_compile or None,
        "seed": seed,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
    }
    model_overrides = {**file_model, **{k: v for k, v in cli_model.items() if v is not None}}
    train_overrides = {**file_train, **{k: v for k, v in cli_train.items() if v is not None}}
    if isinstance(train_overrides.get("data"), str):
        train_overrides["data"] = [train_overrides["data"]]
    config = TrainConfig(**train_overrides)
    config.validate()
    out = config.out_dir
    if resume:
        _check_resume(Path(out), preset, model_overrides, train_overrides)
    model_config = GPTConfig.preset(preset or DEFAULT_PRESET, **model_overrides)

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
    export = "gptkit export" if out == DEFAULT_OUT else f"gptkit export --checkpoint {out}"
    click.echo(
        f"Saved to {Path(out) / 'best'} (last step: {Path(out) / 'last'}); validation "
        f"{result.best_val_bpc:.3f} bits/char (loss {result.best_val_loss:.3f}), "
        f"{result.step} steps in {result.seconds / 60:.1f} min. Next: {export}",
        err=True,
    )


def _read_config_file(
    path: str | None, model_fields: set[str], train_fields: set[str]
) -> tuple[dict, dict]:
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


def _check_resume(run_dir: Path, preset: str | None, model: dict, train: dict) -> None:
    """A resumed run keeps its model and schedule: a flag that disagrees is an error, not ignored."""
    from gpt_core.checkpoint import read_config
    from gpt_core.config import GPTConfig
    from gpt_core.train import RESUME_FIXED, last_checkpoint

    saved = read_config(last_checkpoint(run_dir))
    wanted = GPTConfig.preset(preset).to_dict() if preset else {}
    wanted.pop("vocab_size", None)  # set by the tokenizer, not by the preset
    checks = [(saved.get("model", {}), {**wanted, **model})]
    checks.append((saved.get("train", {}), {k: v for k, v in train.items() if k in RESUME_FIXED}))
    for saved_fields, asked in checks:
        for key, value in asked.items():
            if key in saved_fields and saved_fields[key] != value:
                raise ConfigError(
                    f"the run in {run_dir} has {key} {saved_fields[key]}, not {value}; --resume "
                    f"keeps the run's settings (drop the flag, or start a new run with "
                    f"--init-from {run_dir})"
                )


class _Display:
    """Turns training events into a tqdm bar and log lines on stderr."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, event) -> None:
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
        elif event.kind == "eval":
            d = event.data
            best = " (best)" if d["best"] else ""
            line = (
                f"step {event.step}: train loss {d['loss']:.3f}, val loss {d['val_loss']:.3f}, "
                f"val {d['val_bpc']:.3f} bits/char{best}"
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
