"""The training loop: batches, accumulation, clipping, evaluation, samples, checkpoints, resume.

The library never prints: :func:`train` reports through a callback that receives :class:`Event`s
(the CLI turns them into a progress bar and log lines) and returns a :class:`TrainResult`.

Training on CPU is deterministic for a seed, and ``resume=True`` continues bit for bit: the data
order is a pure function of (seed, epoch), and the optimizer, scaler and every RNG state travel in
the checkpoint. The first Ctrl-C finishes the current step, saves, and returns; a second one
stops at once (the previous checkpoint stays loadable).

Runs under ``torchrun`` too (see ``gpt_core.distributed``): rank 0 alone evaluates, writes and
reports; each rank takes its share of every micro-batch; gradients synchronise on the last one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from gpt_core import schedule
from gpt_core.checkpoint import (
    load_model,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
)
from gpt_core.config import GPTConfig
from gpt_core.dataset import (
    CustomDataset,
    bundled_corpus_path,
    read_text,
    resolve_text_files,
    token_char_counts,
)
from gpt_core.distributed import Distributed
from gpt_core.metrics import (
    METRICS_FILE,
    PLOT_FILE,
    append_metrics,
    truncate_metrics,
    write_loss_plot,
)
from gpt_core.model import GPT
from gpt_core.train_config import DEFAULT_MAX_STEPS, RESUME_FIXED, TrainConfig
from runtime.errors import CheckpointError, ConfigError
from runtime.tokenizer import Tokenizer


@dataclass
class Event:
    """Something a progress display may want to show.

    kind: "start" (params, device, tokens, vocab, steps_per_epoch, world_size), "step" (loss, lr,
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


def train(
    model_config: GPTConfig,
    config: TrainConfig,
    *,
    callback: Callback | None = None,
    resume: bool = False,
    init_from: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train a model of ``model_config`` as ``config`` says; returns where it saved and the result.

    resume: continue the run in ``config.out_dir`` from its ``last`` checkpoint (the model shape
        and the fields in RESUME_FIXED come from the checkpoint).
    init_from: start from a gptkit checkpoint or a local Hugging Face GPT-2 directory (its shape
        and tokenizer; ``model_config`` is not used).
    """
    if resume and init_from is not None:
        raise ConfigError("--resume continues a run and --init-from starts one; pick one")
    callback = callback or (lambda event: None)
    run_dir = Path(config.out_dir)
    state = None
    if resume:
        checkpoint = last_checkpoint(run_dir)
        state = load_training_state(checkpoint)
        model, tokenizer = load_model(checkpoint)
        saved = state.get("train_config", {})
        config = dataclasses.replace(config, **{k: saved[k] for k in RESUME_FIXED if k in saved})
    config.validate()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a directory for the run")
    dist = Distributed.from_env()

    def emit(event: Event) -> None:
        if dist.is_main:  # one report, not one per rank
            callback(event)

    dist.check_batch(config.batch_size)
    _set_threads(config.threads, dist)
    device = schedule.pick_device(config.device, dist.local_rank)
    precision = schedule.resolve_precision(config.precision, device)
    files = resolve_text_files(config.data) if config.data else [bundled_corpus_path()]
    if init_from is not None:
        model, tokenizer = _init_from(Path(init_from))
    elif not resume:
        tokenizer = build_tokenizer(config.tokenizer, files, config.vocab_size)
        torch.manual_seed(config.seed)
        model = GPT(model_config.replace(vocab_size=tokenizer.n_vocab))
    block_size = model.config.block_size
    train_set = CustomDataset(files, tokenizer, block_size, val_fraction=config.val_fraction)
    val_set = CustomDataset(
        files, tokenizer, block_size, split="val", val_fraction=config.val_fraction
    )

    model.to(device)
    optimizer = schedule.make_optimizer(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=(config.beta1, config.beta2),
        device=device,
    )
    scaler = schedule.grad_scaler(precision, device)
    global_batch = config.batch_size * config.grad_accum
    steps_per_epoch = max(1, len(train_set.epoch_starts(0, config.seed)) // global_batch)
    total = schedule.total_steps(
        config.max_steps, config.epochs, steps_per_epoch, default=DEFAULT_MAX_STEPS
    )
    sampler = torch.Generator().manual_seed(config.seed)
    step, best_val, best_bpc, elapsed_before = 0, math.inf, math.inf, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        best_val, best_bpc = float(state["best_val_loss"]), float(state["best_val_bpc"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        sampler.set_state(state["sampler_rng"])
    saved_config = {**dataclasses.asdict(config), "init_from": _str_or_none(init_from)}
    if state is not None:
        saved_config["init_from"] = state.get("train_config", {}).get("init_from")
    ddp_model = dist.wrap(model, device)
    forward = torch.compile(ddp_model) if config.compile else ddp_model
    chars = torch.from_numpy(token_char_counts(tokenizer))
    metrics_path = run_dir / METRICS_FILE
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, step)
    emit(
        Event(
            "start",
            step,
            total,
            {
                "params": model.num_params(),
                "device": str(device),
                "precision": precision,
                "tokens": len(train_set.ids),
                "vocab": tokenizer.n_vocab,
                "steps_per_epoch": steps_per_epoch,
                "world_size": dist.world_size,
            },
        )
    )

    def evaluate() -> dict[str, Any]:
        nats, n_tokens, n_chars = estimate_loss(
            model, val_set, config.eval_windows, config.batch_size, chars, precision, device
        )
        prompt = tokenizer.encode(config.sample_prompt) or [max(tokenizer.eot_token, 0)]
        sample = model.generate(
            torch.tensor([prompt], device=device),
            config.sample_tokens,
            temperature=0.8,
            top_k=50,
            generator=sampler if device.type == "cpu" else None,
        )
        return {
            "val_loss": nats / n_tokens,
            "val_bpc": nats / math.log(2) / n_chars,
            "sample": tokenizer.decode(sample[0, len(prompt) :].tolist()),
        }

    def save(is_best: bool) -> None:
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "elapsed_s": elapsed,
            "best_val_loss": best_val,
            "best_val_bpc": best_bpc,
            "torch_rng": torch.get_rng_state(),
            "sampler_rng": sampler.get_state(),
            "train_config": saved_config,
        }
        if device.type == "cuda":
            train_state["cuda_rng"] = torch.cuda.get_rng_state(device)
        path = save_checkpoint(
            run_dir,
            step,
            model,
            tokenizer,
            train_config=saved_config,
            state=train_state,
            is_best=is_best,
        )
        emit(Event("checkpoint", step, total, {"path": str(path), "best": is_best}))

    started = time.perf_counter()
    elapsed = elapsed_before
    interrupted = False
    try:
        with _StopOnSigint() as stop:
            while step < total:
                t0 = time.perf_counter()
                lr = schedule.learning_rate(
                    step,
                    total,
                    lr=config.lr,
                    warmup_steps=config.warmup_steps,
                    min_lr_ratio=config.min_lr_ratio,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                starts = _batch_starts(train_set, step, steps_per_epoch, global_batch, config.seed)
                loss_sum = 0.0
                for micro in range(config.grad_accum):
                    micro_starts = starts[
                        micro * config.batch_size : (micro + 1) * config.batch_size
                    ]
                    x, y = train_set.batch(dist.shard(micro_starts))
                    x, y = x.to(device), y.to(device)
                    with (
                        dist.sync_gradients(ddp_model, micro == config.grad_accum - 1),
                        schedule.autocast(precision, device),
                    ):
                        loss = forward(x, y).loss / config.grad_accum
                    scaler.scale(loss).backward()
                    loss_sum += loss.item()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum = dist.mean(loss_sum)
                now = time.perf_counter()
                elapsed = elapsed_before + now - started
                record = {
                    "step": step,
                    "loss": loss_sum,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": global_batch * block_size / (now - t0),
                    "epoch": step / steps_per_epoch,
                    "elapsed_s": elapsed,
                }
                emit(Event("step", step, total, record))
                stopping = dist.broadcast_flag(stop.requested)
                due = step % config.eval_interval == 0 or step % steps_per_epoch == 0
                if dist.is_main and (due or step == total or stopping):
                    ev = evaluate()
                    is_best = ev["val_loss"] < best_val
                    if is_best:
                        best_val, best_bpc = ev["val_loss"], ev["val_bpc"]
                    record.update(val_loss=ev["val_loss"], val_bpc=ev["val_bpc"])
                    append_metrics(metrics_path, record)
                    emit(Event("eval", step, total, {**record, **ev, "best": is_best}))
                    save(is_best)
                elif dist.is_main and config.log_interval and step % config.log_interval == 0:
                    append_metrics(metrics_path, record)
                if stopping:
                    interrupted = True
                    emit(Event("interrupted", step, total, {"run_dir": str(run_dir)}))
                    break
        dist.barrier()
    finally:
        dist.close()
    if dist.is_main and not interrupted:
        emit(
            Event("done", step, total, {"plot": write_loss_plot(metrics_path, run_dir / PLOT_FILE)})
        )
    return TrainResult(
        run_dir, step, best_val, best_bpc, interrupted, elapsed, model, tokenizer, dist.rank
    )


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


def _init_from(directory: Path) -> tuple[GPT, Tokenizer]:
    """A gptkit checkpoint or run directory, or a local Hugging Face GPT-2 directory."""
    try:
        hf = "model_type" in json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        hf = False
    if hf:
        from gpt_core.hf import load_hf_gpt2

        return load_hf_gpt2(directory)
    return load_model(directory)


def _batch_starts(
    dataset: CustomDataset, step: int, steps_per_epoch: int, global_batch: int, seed: int
):
    epoch, index = divmod(step, steps_per_epoch)
    return dataset.epoch_starts(epoch, seed)[index * global_batch : (index + 1) * global_batch]


def _set_threads(threads: int | None, dist: Distributed) -> None:
    """Several ranks on one CPU would oversubscribe its cores; split them between the ranks."""
    if threads is None and dist.enabled and not torch.cuda.is_available():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        threads = max(1, (os.cpu_count() or 1) // local_world)
    if threads is not None:
        torch.set_num_threads(threads)


def _str_or_none(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else str(value)


class _StopOnSigint:
    """The first Ctrl-C asks the loop to stop after this step; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


__all__ = ["Event", "TrainConfig", "TrainResult", "train", "write_loss_plot"]
