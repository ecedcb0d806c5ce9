"""The training loop: batches, accumulation, clipping, evaluation, samples, checkpoints, resume.

The library never prints: :func:`train` reports through a callback that receives :class:`Event`s
(the CLI turns them into a progress bar and log lines) and returns a :class:`TrainResult`.

Training on CPU is deterministic for a seed, and ``resume=True`` continues bit for bit: the data
order is a pure function of (seed, epoch), and the optimizer, scaler and every RNG state travel in
the checkpoint. The first Ctrl-C finishes the current step, saves, and returns; a second one
stops at once (the previous checkpoint stays loadable). A resume that asks for a later end goes
on past the run's planned end, its learning rate re-planned without a jump. One process writes a
run directory at a time (``gpt_core.run_lock``).

Runs under ``torchrun`` too (see ``gpt_core.distributed``), on one machine or several: global
rank 0 alone reads the run to resume, evaluates, writes and reports; each rank takes its share of
every micro-batch; gradients synchronise on the last one; a Ctrl-C on any rank stops them all.

Read it top to bottom: :func:`train` is the whole loop; :class:`_Run` holds one session's state
and does each part of it, in order: setup (device, tokenizer and model, data, optimizer, the
restored state), one optimizer step, evaluation, and saving a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_core import schedule, tracking
from gpt_core.checkpoint import load_model, load_training_state, save_checkpoint
from gpt_core.config import GPTConfig
from gpt_core.dataset import (
    CustomDataset,
    bundled_corpus_path,
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
from gpt_core.run_lock import RunDirectoryBusyError, RunLock, StopOnSigint
from gpt_core.train_config import (
    DEFAULT_MAX_STEPS,
    DEFAULT_PRESET,
    RESUME_FIXED,
    TrainConfig,
    check_resume,
    saved_recipe,
)
from gpt_core.train_events import Callback, Event, TrainResult
from gpt_core.train_setup import build_tokenizer, estimate_loss, last_checkpoint, load_init_from
from runtime.errors import ConfigError
from runtime.tokenizer import Tokenizer


def train(
    model_config: GPTConfig | None,
    config: TrainConfig,
    *,
    callback: Callback | None = None,
    resume: bool = False,
    init_from: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train a model of ``model_config`` as ``config`` says; returns where it saved and the result.

    model_config: the model's shape (its vocab_size always comes from the tokenizer); ``None``
        means the ``DEFAULT_PRESET`` shape for a new run, the run's own shape on resume, and the
        source's with ``init_from``.
    resume: continue the run in ``config.out_dir`` from its ``last`` checkpoint, bit for bit. The
        run keeps its shape and the fields in ``RESUME_FIXED`` (data, tokenizer, batch, schedule,
        seed, ...), and a conflicting request is a ConfigError, never silently dropped: a given
        ``model_config`` must be the run's shape, and each RESUME_FIXED field of ``config`` set
        to something other than its TrainConfig default must equal the run's value (fields left
        at their defaults take the run's). The other fields (device, precision, compile,
        threads, logging and samples) apply to the resumed session as given (precision
        ``auto`` keeps the precision the run trained in). The exception is
        the length (``max_steps``/``epochs``): another end past the current step continues the
        run there, finished or not, with the learning rate re-planned without a jump (cosine
        from the current rate to the floor at the new end: ``schedule.replan``) and a "replan"
        event; an end at or before the current step is a ConfigError.
    init_from: start a new run from a gptkit checkpoint or a local Hugging Face GPT-2 directory
        (its weights and tokenizer). A given ``model_config`` must have the source's shape
        (``train_setup.SHAPE_FIELDS``, else a ConfigError); its dropout is used. Not with
        ``resume``.

    One process trains into a directory at a time: rank 0 holds ``gpt_core.run_lock.RunLock``
    while the run lasts, and a second ``train`` into it raises RunDirectoryBusyError at once.
    """
    if resume and init_from is not None:
        raise ConfigError(
            "--resume and --init-from cannot be combined: resume continues a run, "
            "init-from starts a new one"
        )
    config.validate()
    tracking.check_tracker(config.log)
    if Path(config.out_dir).exists() and not Path(config.out_dir).is_dir():
        raise ConfigError(f"--out {config.out_dir} is a file; give a directory for the run")

    dist = Distributed.from_env()
    lock = RunLock(config.out_dir)
    try:
        _lock(lock, dist)
        restored = None
        if resume:  # the run's recipe replaces the defaults (checked and validated when it began)
            config, restored = _restore(model_config, config, dist)
        run = _Run(model_config, config, dist, callback, restored, init_from)
        try:
            _loop(run)
        finally:
            run.close()
        dist.barrier()
    finally:
        lock.release()
        dist.close()
    if dist.is_main and not run.interrupted:
        run.emit("done", {"plot": write_loss_plot(run.metrics_path, run.run_dir / PLOT_FILE)})
    return run.result()


def _lock(lock: RunLock, dist: Distributed) -> None:
    """Rank 0 takes the run directory's lock; every rank stops when it cannot."""
    busy: RunDirectoryBusyError | None = None
    if dist.is_main:
        try:
            lock.acquire()
        except RunDirectoryBusyError as e:
            busy = e
    if dist.broadcast_flag(busy is not None):
        raise busy or RunDirectoryBusyError(f"{lock.run_dir} is in use by another training run")


def _loop(run: _Run) -> None:
    config, dist = run.config, run.dist
    run.start()
    with StopOnSigint() as stop:
        while run.step < run.total:
            record = run.optimizer_step()
            # Any rank's Ctrl-C stops every rank after this step (the signal may reach one node).
            stopping = dist.any_flag(stop.requested)
            # Evaluate and checkpoint every eval_interval steps, at each epoch's end, at the
            # last step and on Ctrl-C; in between, a metrics row every log_interval steps.
            step = run.step
            due = step % config.eval_interval == 0 or step % run.steps_per_epoch == 0
            if dist.is_main and (due or step == run.total or stopping):
                run.evaluate_and_save(record)
            elif dist.is_main and config.log_interval and step % config.log_interval == 0:
                run.log(record)
            if stopping:
                run.interrupted = True
                run.emit("interrupted", {"run_dir": str(run.run_dir)})
                break


@dataclass
class _Restored:
    """What a resumed run takes from its ``last`` checkpoint."""

    model: GPT
    tokenizer: Tokenizer
    state: dict[str, Any]  # optimizer, scaler, step, RNG states, the run's train_config
    saved: dict[str, Any]  # the run's train_config as it was saved


def _restore(
    model_config: GPTConfig | None, config: TrainConfig, dist: Distributed
) -> tuple[TrainConfig, _Restored]:
    """Load the run to resume, refuse conflicting requests, and take its RESUME_FIXED fields.

    Under torchrun rank 0 alone reads the checkpoint (the run directory may be on its machine
    only) and hands the rest what they need: the shape, tokenizer and training state; their
    weights come from rank 0 when DDP wraps the model (it broadcasts rank 0's state_dict).
    """
    run_dir = Path(config.out_dir)
    loaded: list[tuple[GPT, Tokenizer]] = []

    def read() -> tuple[dict[str, Any], bytes, dict[str, Any], dict[str, Any]]:
        checkpoint = last_checkpoint(run_dir)
        state = load_training_state(checkpoint)
        model, tokenizer = load_model(checkpoint)
        saved = state.get("train_config", {})  # check_resume fills what older runs lack
        kept = check_resume(run_dir, model.config.to_dict(), saved, model_config, config)
        loaded.append((model, tokenizer))
        return model.config.to_dict(), tokenizer.to_bytes() if dist.enabled else b"", state, kept

    shape, tokenizer_bytes, state, kept = dist.from_main(read)
    if loaded:  # rank 0 (or a single process)
        model, tokenizer = loaded[0]
    else:
        model, tokenizer = GPT(GPTConfig.from_dict(shape)), Tokenizer.from_bytes(tokenizer_bytes)
    saved = saved_recipe(state.get("train_config", {}))
    return dataclasses.replace(config, **kept), _Restored(model, tokenizer, state, saved)


def _build_tokenizer(config: TrainConfig, files: list[Path], dist: Distributed) -> Tokenizer:
    """A new run's tokenizer; under torchrun built once, by rank 0, and the same on every rank."""
    if not dist.enabled:
        return build_tokenizer(config.tokenizer, files, config.vocab_size)
    data = dist.from_main(
        lambda: build_tokenizer(config.tokenizer, files, config.vocab_size).to_bytes()
    )
    return Tokenizer.from_bytes(data)


def _resumed_precision(state: dict[str, Any], device: torch.device, auto: str) -> str:
    """``--precision auto`` on resume: the precision the run trained in, so it continues exactly.

    Runs saved before the precision was recorded trained in what ``auto`` was then: fp32 except
    on CUDA. A precision this device cannot run (fp16 saved on a GPU, resumed on a CPU) gives way
    to this device's ``auto``.
    """
    saved = state.get("precision", "fp32" if device.type != "cuda" else auto)
    try:
        return schedule.resolve_precision(str(saved), device)
    except ConfigError:
        return auto


class _Run:
    """One training session: everything the loop reads and updates, and the steps it takes."""

    def __init__(
        self,
        model_config: GPTConfig | None,
        config: TrainConfig,
        dist: Distributed,
        callback: Callback | None,
        restored: _Restored | None,
        init_from: str | os.PathLike[str] | None,
    ) -> None:
        self.config, self.dist, self.callback = config, dist, callback
        self.run_dir = Path(config.out_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.interrupted = False
        self.tracker: tracking.Tracker | None = None

        # Device, threads and precision.
        dist.check_batch(config.batch_size)
        schedule.set_threads(config.threads, dist)
        self.device = schedule.pick_device(config.device, dist.local_rank)
        self.precision = schedule.resolve_precision(config.precision, self.device)
        if restored is not None and config.precision == "auto":
            self.precision = _resumed_precision(restored.state, self.device, self.precision)

        # Tokenizer and model: from the run, from init_from, or new (seeded, so runs repeat).
        files = resolve_text_files(config.data) if config.data else [bundled_corpus_path()]
        if restored is not None:
            self.model, self.tokenizer = restored.model, restored.tokenizer
        elif init_from is not None:
            self.model, self.tokenizer = load_init_from(init_from, model_config)
        else:
            self.tokenizer = _build_tokenizer(config, files, dist)
            torch.manual_seed(config.seed)
            shape = GPTConfig.preset(DEFAULT_PRESET) if model_config is None else model_config
            self.model = GPT(shape.replace(vocab_size=self.tokenizer.n_vocab))

        # Data: fixed train/val splits of the token stream, in block-size windows. The token
        # cache is built by the first rank to get there, the others wait and read it.
        block_size = self.model.config.block_size
        self.train_set, self.val_set = dist.main_first(
            lambda: (
                CustomDataset(files, self.tokenizer, block_size, val_fraction=config.val_fraction),
                CustomDataset(
                    files, self.tokenizer, block_size, split="val", val_fraction=config.val_fraction
                ),
            )
        )
        self.token_chars = torch.from_numpy(token_char_counts(self.tokenizer))
        self.global_batch = config.batch_size * config.grad_accum
        self.tokens_per_step = self.global_batch * block_size
        self.steps_per_epoch = max(
            1, len(self.train_set.epoch_starts(0, config.seed)) // self.global_batch
        )
        self.total = schedule.total_steps(
            config.max_steps, config.epochs, self.steps_per_epoch, default=DEFAULT_MAX_STEPS
        )

        # Optimizer, loss scaler and the sampler's generator.
        self.model.to(self.device)
        self.optimizers = schedule.make_optimizers(
            self.model,
            optimizer=config.optimizer,
            lr=config.lr,
            muon_lr=config.muon_peak_lr,
            weight_decay=config.weight_decay,
            betas=(config.beta1, config.beta2),
            device=self.device,
        )
        self.scaler = schedule.grad_scaler(self.precision, self.device)
        self.sampler = torch.Generator().manual_seed(config.seed)

        # Progress, then the resumed run's state on top of the fresh one.
        self.step, self.best_val, self.best_bpc, self.elapsed_before = 0, math.inf, math.inf, 0.0
        # A re-planned schedule's (step, lr) (see schedule.replan), and the "replan" event's data.
        self.restart: tuple[int, float] | None = None
        self.replanned: dict[str, Any] | None = None
        self.saved_config: dict[str, Any] = {
            **dataclasses.asdict(config),
            "init_from": None if init_from is None else str(init_from),
        }
        if restored is not None:
            self._load_state(restored.state)
            self._replan(restored.saved)
        self.elapsed = self.elapsed_before

        # DDP wrapping and compilation: the forward the steps use.
        self.ddp_model = dist.wrap(self.model, self.device)
        self.forward: Callable[..., Any] = (
            torch.compile(self.ddp_model) if config.compile else self.ddp_model
        )

    def _load_state(self, state: dict[str, Any]) -> None:
        # AdamW's state under "optimizer" (as runs before Muon saved it), Muon's under "muon".
        self.optimizers[0].load_state_dict(state["optimizer"])
        if len(self.optimizers) > 1:
            self.optimizers[1].load_state_dict(state["muon"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed_before = int(state["step"]), float(state["elapsed_s"])
        self.best_val, self.best_bpc = float(state["best_val_loss"]), float(state["best_val_bpc"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.sampler.set_state(state["sampler_rng"])
        self.saved_config["init_from"] = state.get("train_config", {}).get("init_from")
        if "lr_restart" in state:
            start, lr = state["lr_restart"]
            self.restart = (int(start), float(lr))

    def _replan(self, saved: dict[str, Any]) -> None:
        """A resumed run asked for another end: go on to it, the learning rate without a jump."""
        config = self.config
        old_total = schedule.total_steps(
            saved.get("max_steps"),
            saved.get("epochs"),
            self.steps_per_epoch,
            default=DEFAULT_MAX_STEPS,
        )
        if self.total == old_total:
            return
        if self.total <= self.step:
            asked = (
                f"--max-steps {config.max_steps}"
                if config.max_steps is not None
                else f"--epochs {config.epochs} ({self.total} steps)"
            )
            raise ConfigError(
                f"the run in {self.run_dir} is at step {self.step}; {asked} does not go past it: "
                f"ask for more than {self.step} steps to train it further"
            )
        self.restart = schedule.replan(
            self.step,
            old_total,
            lr=config.lr,
            warmup_steps=config.warmup_steps,
            min_lr_ratio=config.min_lr_ratio,
            restart=self.restart,
            shape=config.lr_schedule,
            decay_fraction=config.decay_fraction,
        )
        self.replanned = {"old_end": old_total, "new_end": self.total, "lr": self.restart[1]}

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Report an event (rank 0 only: one report, not one per rank)."""
        if self.dist.is_main and self.callback is not None:
            self.callback(Event(kind, self.step, self.total, data))

    def start(self) -> None:
        """Prepare the run directory, announce the run, and start the clock."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.metrics_path, self.step)  # rows past the checkpoint are redone
            self.tracker = tracking.open_tracker(
                self.config.log, self.run_dir, resumed_at=self.step
            )
        if self.replanned is not None:
            self.emit("replan", self.replanned)
        self.emit(
            "start",
            {
                "params": self.model.num_params(),
                "device": str(self.device),
                "precision": self.precision,
                "tokens": len(self.train_set.ids),
                "vocab": self.tokenizer.n_vocab,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.dist.world_size,
            },
        )
        self.started = time.perf_counter()

    def optimizer_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; emits and returns its metrics."""
        config, dist = self.config, self.dist
        t0 = time.perf_counter()
        lr = schedule.learning_rate(
            self.step,
            self.total,
            lr=config.lr,
            warmup_steps=config.warmup_steps,
            min_lr_ratio=config.min_lr_ratio,
            restart=self.restart,
            shape=config.lr_schedule,
            decay_fraction=config.decay_fraction,
        )
        schedule.set_learning_rate(self.optimizers, lr / config.lr)
        self.model.train()
        epoch, index = divmod(self.step, self.steps_per_epoch)
        batch = slice(index * self.global_batch, (index + 1) * self.global_batch)
        starts = self.train_set.epoch_starts(epoch, config.seed)[batch]
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            micro_starts = starts[micro * config.batch_size : (micro + 1) * config.batch_size]
            x, y = self.train_set.batch(dist.shard(micro_starts))
            x, y = x.to(self.device), y.to(self.device)
            last_micro = micro == config.grad_accum - 1
            with (
                dist.sync_gradients(self.ddp_model, last_micro),
                schedule.autocast(self.precision, self.device),
            ):
                loss = self.forward(x, y).loss / config.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.item()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.step += 1

        loss_sum = dist.mean(loss_sum)  # every rank's share of the batch
        now = time.perf_counter()
        self.elapsed = self.elapsed_before + now - self.started
        record = {
            "step": self.step,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": self.tokens_per_step / (now - t0),
            "epoch": self.step / self.steps_per_epoch,
            "elapsed_s": self.elapsed,
        }
        self.emit("step", record)
        return record

    def evaluate_and_save(self, record: dict[str, Any]) -> None:
        """Evaluate, log the step with its validation figures, and checkpoint (best when best)."""
        result = self.evaluate()
        is_best = result["val_loss"] < self.best_val
        if is_best:
            self.best_val, self.best_bpc = result["val_loss"], result["val_bpc"]
        record.update(val_loss=result["val_loss"], val_bpc=result["val_bpc"])
        self.log(record)
        if self.tracker is not None:
            self.tracker.sample(self.step, result["sample"])
        self.emit("eval", {**record, **result, "best": is_best})
        self.save(is_best)

    def log(self, record: dict[str, Any]) -> None:
        """A row of metrics.jsonl (and of the tracker's, when one is asked for)."""
        append_metrics(self.metrics_path, record)
        if self.tracker is not None:
            self.tracker.log(record)

    def evaluate(self) -> dict[str, Any]:
        """Validation loss (nats/token), bits per character, and a sample from the model."""
        config, tokenizer, device = self.config, self.tokenizer, self.device
        nats, n_tokens, n_chars = estimate_loss(
            self.model,
            self.val_set,
            config.eval_windows,
            config.batch_size,
            self.token_chars,
            self.precision,
            device,
        )
        prompt = tokenizer.encode(config.sample_prompt) or [max(tokenizer.eot_token, 0)]
        sample = self.model.generate(
            torch.tensor([prompt], device=device),
            config.sample_tokens,
            temperature=0.8,
            top_k=50,
            # The run's seeded generator (saved in checkpoints) can drive CPU sampling only.
            generator=self.sampler if device.type == "cpu" else None,
        )
        return {
            "val_loss": nats / n_tokens,
            "val_bpc": nats / math.log(2) / n_chars,
            "sample": tokenizer.decode(sample[0, len(prompt) :].tolist()),
        }

    def save(self, is_best: bool) -> None:
        """A checkpoint with everything ``resume`` needs to continue bit for bit."""
        state: dict[str, Any] = {
            "optimizer": self.optimizers[0].state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed,
            "best_val_loss": self.best_val,
            "best_val_bpc": self.best_bpc,
            "torch_rng": torch.get_rng_state(),
            "sampler_rng": self.sampler.get_state(),
            "train_config": self.saved_config,
            "precision": self.precision,
        }
        if len(self.optimizers) > 1:
            state["muon"] = self.optimizers[1].state_dict()
        if self.restart is not None:
            state["lr_restart"] = list(self.restart)
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        path = save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.tokenizer,
            train_config=self.saved_config,
            state=state,
            is_best=is_best,
        )
        self.emit("checkpoint", {"path": str(path), "best": is_best})

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def result(self) -> TrainResult:
        return TrainResult(
            self.run_dir,
            self.step,
            self.best_val,
            self.best_bpc,
            self.interrupted,
            self.elapsed,
            self.model,
            self.tokenizer,
            self.dist.rank,
        )


__all__ = [
    "Callback",
    "DEFAULT_MAX_STEPS",
    "RESUME_FIXED",
    "Event",
    "TrainConfig",
    "TrainResult",
    "build_tokenizer",
    "estimate_loss",
    "last_checkpoint",
    "train",
    "write_loss_plot",
]
