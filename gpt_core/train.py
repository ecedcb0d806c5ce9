"""The training loop: AdamW, warmup + cosine schedule, clipping, accumulation, eval, checkpoints.

The library never prints: :func:`train` reports through a callback that receives :class:`Event`s
(the CLI turns them into a progress bar and log lines). Training on CPU is deterministic for a
seed, and ``resume=True`` continues bit for bit: the data order is a pure function of
(seed, epoch), and every RNG state travels in the checkpoint.

Runs under ``torchrun`` too (DDP): rank 0 alone writes checkpoints and reports, each rank takes
its share of every batch, and gradients synchronise only on the last micro-step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_core.checkpoint import load_model, load_training_state, resolve_checkpoint, save_checkpoint
from gpt_core.config import GPTConfig
from gpt_core.dataset import CustomDataset, bundled_corpus_path, read_text, resolve_text_files
from gpt_core.model import GPT
from runtime.errors import ConfigError
from runtime.tokenizer import Tokenizer

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything about a run except the model's shape (that is GPTConfig)."""

    data: list[str] = field(default_factory=list)  # files or directories; empty = bundled corpus
    out_dir: str = "runs/default"
    tokenizer: str = "bpe"  # "bpe" (trained on the data), "gpt2", or a saved tokenizer path
    vocab_size: int = 2048  # for "bpe": small vocabularies train fastest on a CPU
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    epochs: float | None = None  # an epoch = every training window seen once
    max_steps: int | None = None  # wins over epochs when both are given
    eval_interval: int = 200
    eval_batches: int = 20
    sample_tokens: int = 120
    sample_prompt: str = "\n"
    val_fraction: float = 0.1
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    seed: int = 1337
    threads: int | None = None

    def validate(self) -> None:
        positive = ("vocab_size", "batch_size", "grad_accum", "eval_interval", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max-steps must be positive, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )


@dataclass
class Event:
    """Something a progress display may want to show."""

    kind: str  # "start" | "step" | "eval" | "checkpoint" | "done" | "interrupted"
    step: int
    total_steps: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    best_val_bpc: float
    interrupted: bool
    seconds: float


Callback = Callable[[Event], None]


def train(
    model_config: GPTConfig,
    config: TrainConfig,
    *,
    callback: Callback | None = None,
    resume: bool = False,
    init_from: str | None = None,
) -> TrainResult:
    """Train ``model_config`` on ``config.data``; returns where it saved and what it reached."""
    config.validate()
    emit = callback or (lambda event: None)
    dist = _Distributed.from_env()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device, dist)
    run_dir = Path(config.out_dir)

    # --- model, tokenizer and (when resuming) state ------------------------------------------
    state = None
    if resume:
        checkpoint = resolve_checkpoint(
            run_dir / "last" if (run_dir / "last").exists() else run_dir
        )
        saved = load_training_state(checkpoint)
        model, tokenizer = load_model(checkpoint)
        saved_train = saved["train_config"]
        # The data, tokenizer and schedule of a resumed run are the saved ones.
        config = dataclasses.replace(
            config, **{k: v for k, v in saved_train.items() if k in _RESUME_FIXED}
        )
        state = saved
    elif init_from is not None:
        model, tokenizer = _init_from(init_from)
    else:
        files = _data_files(config)
        tokenizer = build_tokenizer(config.tokenizer, files, config.vocab_size)
        model_config = model_config.replace(vocab_size=tokenizer.n_vocab)
        torch.manual_seed(config.seed)
        model = GPT(model_config)
    model_config = model.config
    files = _data_files(config)
    train_set = CustomDataset(
        files, tokenizer, model_config.block_size, split="train", val_fraction=config.val_fraction
    )
    val_set = CustomDataset(
        files, tokenizer, model_config.block_size, split="val", val_fraction=config.val_fraction
    )

    model.to(device)
    optimizer = make_optimizer(model, config, device)
    global_batch = config.batch_size * config.grad_accum
    steps_per_epoch = max(1, len(train_set.epoch_starts(0, config.seed)) // global_batch)
    total_steps = total_training_steps(config, steps_per_epoch)
    step, best_val = 0, math.inf
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, best_val = int(state["step"]), float(state["best_val_loss"])
        torch.set_rng_state(state["torch_rng"])
        sampler_state = state["sampler_rng"]
    train_cfg_dict = dataclasses.asdict(config)

    ddp_model = dist.wrap(model, device)
    compiled = torch.compile(ddp_model) if config.compile else ddp_model
    autocast, scaler = precision_context(config.precision, device)
    sampler_gen = torch.Generator().manual_seed(config.seed)
    if state is not None:
        sampler_gen.set_state(sampler_state)

    def evaluate() -> dict[str, float]:
        loss = estimate_loss(
            model, val_set, config.eval_batches, config.batch_size, device, autocast
        )
        bpc = loss / math.log(2) / val_set.split.chars_per_token
        prompt = torch.tensor(
            [tokenizer.encode(config.sample_prompt) or [max(tokenizer.eot_token, 0)]], device=device
        )
        sample_ids = model.generate(
            prompt, config.sample_tokens, temperature=0.8, top_k=50, generator=sampler_gen
        )
        sample = tokenizer.decode(sample_ids[0, prompt.shape[1] :].tolist())
        return {"val_loss": loss, "val_bpc": bpc, "sample": sample}

    def checkpoint(is_best: bool) -> None:
        if not dist.is_main:
            return
        train_state = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "best_val_loss": best_val,
            "torch_rng": torch.get_rng_state(),
            "sampler_rng": sampler_gen.get_state(),
            "train_config": train_cfg_dict,
        }
        path = save_checkpoint(
            run_dir,
            step,
            model,
            tokenizer,
            train_config=train_cfg_dict,
            state=train_state,
            is_best=is_best,
        )
        emit(Event("checkpoint", step, total_steps, {"path": str(path), "best": is_best}))

    metrics_path = run_dir / "metrics.jsonl"
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    emit(
        Event(
            "start",
            step,
            total_steps,
            {
                "params": model.num_params(),
                "device": str(device),
                "tokens": len(train_set.ids),
                "vocab": tokenizer.n_vocab,
                "steps_per_epoch": steps_per_epoch,
                "world_size": dist.world_size,
            },
        )
    )

    started = time.perf_counter()
    interrupted = False
    tokens_per_step = global_batch * model_config.block_size
    best_bpc = math.inf
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            model.train()
            lr = learning_rate(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            starts = _batch_starts(train_set, step, steps_per_epoch, global_batch, config.seed)
            loss_sum = 0.0
            for micro in range(config.grad_accum):
                micro_starts = starts[micro * config.batch_size : (micro + 1) * config.batch_size]
                x, y = train_set.batch(micro_starts[dist.rank :: dist.world_size])
                x, y = x.to(device), y.to(device)
                last_micro = micro == config.grad_accum - 1
                with dist.sync(ddp_model, last_micro), autocast:
                    loss = compiled(x, y).loss / config.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.item()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            record = {
                "step": step,
                "loss": loss_sum,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_step / dt,
                "epoch": step / steps_per_epoch,
            }
            emit(Event("step", step, total_steps, record))
            if (
                step % config.eval_interval == 0
                or step == total_steps
                or step % steps_per_epoch == 0
            ):
                if dist.is_main:
                    ev = evaluate()
                    is_best = ev["val_loss"] < best_val
                    if is_best:
                        best_val, best_bpc = ev["val_loss"], ev["val_bpc"]
                    record = {
                        **record,
                        "val_loss": ev["val_loss"],
                        "val_bpc": ev["val_bpc"],
                        "elapsed_s": time.perf_counter() - started,
                    }
                    _append_jsonl(metrics_path, record)
                    emit(
                        Event(
                            "eval",
                            step,
                            total_steps,
                            {**record, "sample": ev["sample"], "best": is_best},
                        )
                    )
                    checkpoint(is_best)
    except KeyboardInterrupt:
        interrupted = True
        checkpoint(False)
        emit(Event("interrupted", step, total_steps, {"run_dir": str(run_dir)}))
    finally:
        dist.close()
    if dist.is_main and not interrupted:
        plot = write_loss_plot(metrics_path, run_dir / "loss.png")
        emit(Event("done", step, total_steps, {"plot": plot}))
    if best_bpc == math.inf and best_val < math.inf:
        best_bpc = best_val / math.log(2) / val_set.split.chars_per_token
    return TrainResult(
        run_dir, step, best_val, best_bpc, interrupted, time.perf_counter() - started
    )


# The fields a resumed run takes from its checkpoint rather than the command line.
_RESUME_FIXED = (
    "data",
    "tokenizer",
    "vocab_size",
    "batch_size",
    "grad_accum",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "epochs",
    "max_steps",
    "val_fraction",
    "seed",
    "eval_interval",
    "eval_batches",
    "sample_tokens",
    "sample_prompt",
)


def build_tokenizer(spec: str, files: list[Path], vocab_size: int) -> Tokenizer:
    """``bpe`` (trained on the data), ``gpt2`` (tiktoken's), or a saved tokenizer path."""
    if spec == "bpe":
        from gpt_core.bpe import train_bpe

        # 20 MB of text is plenty to learn a few thousand merges, and bounds the cost on big corpora.
        return train_bpe([read_text(files, limit=20_000_000)], vocab_size, name=f"bpe-{vocab_size}")
    if spec == "gpt2":
        return Tokenizer.gpt2()
    if Path(spec).exists():
        return Tokenizer.load(spec)
    raise ConfigError(
        f"unknown tokenizer {spec!r}; use bpe, gpt2, or the path of a saved tokenizer"
    )


def pick_device(name: str, dist: _Distributed | None = None) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu"
            )
        return torch.device("cuda", dist.local_rank if dist else 0)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but is not available here; use --device cpu")
    if name not in ("cpu", "mps"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def precision_context(precision: str, device: torch.device):
    """(autocast context, grad scaler) for the precision; 'auto' = bf16/fp16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
    enabled = precision in ("bf16", "fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=enabled)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return autocast, scaler


def make_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only: not on biases, LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda"
    )


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    warmup = min(config.warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    min_lr = config.lr * config.min_lr_ratio
    return min_lr + 0.5 * (config.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def total_training_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    if config.epochs is not None:
        return max(1, round(config.epochs * steps_per_epoch))
    return 1000


@torch.no_grad()
def estimate_loss(
    model: GPT,
    dataset: CustomDataset,
    batches: int,
    batch_size: int,
    device: torch.device,
    autocast,
) -> float:
    """Mean loss over fixed, evenly spaced validation windows (the same ones at every eval)."""
    model.eval()
    n_windows = len(dataset)
    count = min(n_windows, batches * batch_size)
    starts = (np.linspace(0, n_windows - 1, count).astype(np.int64) * dataset.block_size).tolist()
    losses = []
    for i in range(0, len(starts), batch_size):
        x, y = dataset.batch(starts[i : i + batch_size])
        with autocast:
            losses.append(model(x.to(device), y.to(device)).loss.float().item() * len(x))
    model.train()
    return sum(losses) / len(starts)


def write_loss_plot(metrics_path: Path, out: Path) -> str | None:
    """A PNG of train and validation loss; None (and no file) when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not metrics_path.exists():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return str(out)


def _batch_starts(
    dataset: CustomDataset, step: int, steps_per_epoch: int, global_batch: int, seed: int
) -> np.ndarray:
    epoch, index = divmod(step, steps_per_epoch)
    starts = dataset.epoch_starts(epoch, seed)
    return starts[index * global_batch : (index + 1) * global_batch]


def _data_files(config: TrainConfig) -> list[Path]:
    return resolve_text_files(config.data) if config.data else [bundled_corpus_path()]


def _init_from(path: str) -> tuple[GPT, Tokenizer]:
    """Start from a gptkit checkpoint or a local Hugging Face GPT-2 directory (fine-tuning)."""
    directory = Path(path)
    if (directory / "config.json").exists() and _is_hf_dir(directory):
        from gpt_core.hf import load_hf_gpt2

        model, tokenizer = load_hf_gpt2(directory)
    else:
        model, tokenizer = load_model(directory)
    return model, tokenizer


def _is_hf_dir(directory: Path) -> bool:
    try:
        return "model_type" in json.loads((directory / "config.json").read_text())
    except (ValueError, OSError):
        return False


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class _Distributed:
    """DDP under torchrun, or a no-op single process."""

    def __init__(self, rank: int, local_rank: int, world_size: int) -> None:
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.is_main = rank == 0

    @classmethod
    def from_env(cls) -> _Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 0, 1)
        import torch.distributed as td

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not td.is_initialized():
            td.init_process_group(backend=backend)
        return cls(td.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def sync(self, model: torch.nn.Module, last_micro_step: bool):
        """Skip the gradient all-reduce on every micro-step but the last."""
        if self.world_size > 1 and not last_micro_step:
            return model.no_sync()
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


__all__ = ["Event", "TrainConfig", "TrainResult", "train"]
