"""The trainer: schedule, optimizer groups, a short run, determinism, exact resume, Ctrl-C, init-from."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from gpt_core import schedule
from gpt_core.checkpoint import load_model, load_training_state, resolve_checkpoint
from gpt_core.config import GPTConfig
from gpt_core.train import Event, TrainConfig, train, write_loss_plot
from runtime.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from gpt_core.model import GPT


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus(tmp_path: Path, shakespeare: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare[:30_000], encoding="utf-8")
    return path


@pytest.fixture
def model_config(tiny_config):
    return tiny_config.replace(block_size=32, dropout=0.1)


def small(corpus: Path, out: Path, **changes) -> TrainConfig:
    """A quick run: 300-id BPE, 8 x 32-token batches, 4 eval windows, fp32."""
    fields = dict(
        data=[str(corpus)],
        out_dir=str(out),
        vocab_size=300,
        batch_size=8,
        max_steps=20,
        eval_interval=10,
        eval_windows=4,
        sample_tokens=5,
        warmup_steps=5,
        log_interval=5,
        threads=1,
        precision="fp32",  # exact arithmetic comparisons; auto may pick bf16 on this CPU
    )
    return TrainConfig(**{**fields, **changes})


def weights(model: GPT) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:3]}"


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    kw: dict[str, Any] = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [schedule.learning_rate(s, 110, **kw) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone after warmup
    assert schedule.learning_rate(110, 110, **kw) == pytest.approx(0.1)
    # a 5-step run warms up for 1 step, not 10
    assert schedule.learning_rate(0, 5, **kw) == 1.0


def test_weight_decay_applies_to_matrices_only(tiny_model) -> None:
    (opt,) = schedule.make_optimizers(
        tiny_model,
        optimizer="adamw",
        lr=1e-3,
        muon_lr=0.02,
        weight_decay=0.1,
        betas=(0.9, 0.99),
        device=torch.device("cpu"),
    )
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    assert any(p is tiny_model.transformer.wte.weight for p in decayed["params"])
    assert any(p is tiny_model.transformer.ln_f.weight for p in plain["params"])
    counted = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert counted == tiny_model.num_params()


def test_devices_and_precisions() -> None:
    cpu = torch.device("cpu")
    assert schedule.pick_device("cpu") == cpu
    assert schedule.resolve_precision("auto", cpu) == (
        "bf16" if schedule.cpu_has_native_bf16() else "fp32"
    )
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        schedule.resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        schedule.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            schedule.pick_device("cuda")


def test_a_short_run_learns_and_reports_through_events(
    corpus, tmp_path, model_config, capsys
) -> None:
    events: list[Event] = []
    result = train(model_config, small(corpus, tmp_path / "run"), callback=events.append)
    assert capsys.readouterr() == ("", "")  # the library never prints
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("step") == 20 and kinds.count("eval") == 2
    evals = [e.data for e in events if e.kind == "eval"]
    assert evals[-1]["val_loss"] < math.log(300) - 0.5  # well below a uniform guess
    assert evals[-1]["val_bpc"] == pytest.approx(result.best_val_bpc)
    assert isinstance(evals[0]["sample"], str)
    assert result.step == 20 and not result.interrupted
    assert result.model.config.vocab_size == result.tokenizer.n_vocab <= 300

    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert "val_bpc" in rows[1] and "val_bpc" not in rows[0]
    saved = json.loads((run / "last" / "config.json").read_text())
    assert saved["train"]["vocab_size"] == 300 and saved["model"]["block_size"] == 32
    model, tokenizer = load_model(run)
    assert tokenizer == result.tokenizer
    assert load_training_state(resolve_checkpoint(run / "last"))["step"] == 20


def test_same_seed_same_weights(corpus, tmp_path, model_config) -> None:
    first = train(model_config, small(corpus, tmp_path / "a", max_steps=6))
    second = train(model_config, small(corpus, tmp_path / "b", max_steps=6))
    assert_bitwise_equal(weights(first.model), weights(second.model))
    third = train(model_config, small(corpus, tmp_path / "c", max_steps=6, seed=7))
    assert not torch.equal(first.model.transformer.wte.weight, third.model.transformer.wte.weight)


def test_ctrl_c_saves_and_resume_is_bitwise_exact(corpus, tmp_path, model_config) -> None:
    straight = train(model_config, small(corpus, tmp_path / "straight"))

    events: list[Event] = []

    def ctrl_c_at_step_7(event: Event) -> None:
        events.append(event)
        if event.kind == "step" and event.step == 7:
            signal.raise_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends

    stopped = train(model_config, small(corpus, tmp_path / "split"), callback=ctrl_c_at_step_7)
    assert stopped.interrupted and stopped.step == 7
    assert events[-1].kind == "interrupted" and "done" not in [e.kind for e in events]
    assert load_training_state(resolve_checkpoint(tmp_path / "split" / "last"))["step"] == 7
    # No shape and a default TrainConfig: the run's own shape and recipe decide the batches.
    session = TrainConfig(out_dir=str(tmp_path / "split"), log_interval=5, threads=1)
    resumed = train(None, session, resume=True)
    assert resumed.step == 20 and not resumed.interrupted
    assert_bitwise_equal(weights(straight.model), weights(resumed.model))
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 7, 10, 15, 20]


def test_resume_refuses_settings_that_disagree_with_the_run(
    corpus: Path, tmp_path: Path, model_config: GPTConfig
) -> None:
    run = tmp_path / "run"
    train(model_config, small(corpus, run, max_steps=2))
    last = resolve_checkpoint(run / "last")
    with pytest.raises(ConfigError, match=r"has lr 0.002, not 0.5; --resume keeps") as info:
        train(model_config, small(corpus, run, max_steps=2, lr=0.5), resume=True)
    assert "\n" not in str(info.value) and f"--init-from {run}" in str(info.value)
    with pytest.raises(ConfigError, match="is at step 2; --max-steps 1 does not go past it"):
        train(None, TrainConfig(out_dir=str(run), max_steps=1), resume=True)
    with pytest.raises(ConfigError, match=r"--epochs 0.01 \(1 steps\) does not go past it"):
        train(None, TrainConfig(out_dir=str(run), epochs=0.01), resume=True)
    with pytest.raises(ConfigError, match="has n_embd 64, not 128"):
        train(model_config.replace(n_embd=128), small(corpus, run, max_steps=2), resume=True)
    with pytest.raises(ConfigError, match="has block_size 32, not 128"):  # a whole shape
        train(GPTConfig.preset("small-cpu"), TrainConfig(out_dir=str(run)), resume=True)
    assert resolve_checkpoint(run / "last") == last  # nothing ran
    # the same values, and the settings outside RESUME_FIXED, are fine
    again = train(model_config, small(corpus, run, max_steps=2, sample_tokens=2), resume=True)
    assert again.step == 2 and not again.interrupted


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path, model_config) -> None:
    config = model_config.replace(dropout=0.0)
    # AdamW: Muon's bf16 Newton-Schulz step magnifies the sums' rounding beyond 1e-5.
    big = train(config, small(corpus, tmp_path / "big", max_steps=4, optimizer="adamw"))
    accum = train(
        config,
        small(corpus, tmp_path / "acc", max_steps=4, batch_size=2, grad_accum=4, optimizer="adamw"),
    )
    a, b = weights(big.model), weights(accum.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_epochs_set_the_length(corpus, tmp_path, model_config) -> None:
    events: list[Event] = []
    result = train(
        model_config,
        small(corpus, tmp_path / "run", max_steps=None, epochs=1, eval_interval=1000),
        callback=events.append,
    )
    steps_per_epoch = events[0].data["steps_per_epoch"]
    assert result.step == steps_per_epoch
    assert [e.step for e in events if e.kind == "eval"] == [steps_per_epoch]


def test_bf16_autocast_trains_on_cpu(corpus, tmp_path, model_config) -> None:
    result = train(model_config, small(corpus, tmp_path / "run", max_steps=2, precision="bf16"))
    assert math.isfinite(result.best_val_loss)
    assert result.model.transformer.wte.weight.dtype == torch.float32  # master weights stay fp32


def test_init_from_a_checkpoint_keeps_its_weights_and_tokenizer(
    corpus, tmp_path, model_config
) -> None:
    base = train(model_config, small(corpus, tmp_path / "base", max_steps=10))
    with pytest.raises(ConfigError, match="has n_layer 2, not 1; a model started from") as info:
        train(
            model_config.replace(n_layer=1),
            small(corpus, tmp_path / "tuned"),
            init_from=tmp_path / "base",
        )
    assert "\n" not in str(info.value) and not (tmp_path / "tuned").exists()
    tuned = train(
        model_config.replace(dropout=0.0),  # the shape must match; dropout may change
        small(corpus, tmp_path / "tuned", max_steps=1, lr=1e-12, vocab_size=400),
        init_from=tmp_path / "base",
    )
    assert tuned.tokenizer == base.tokenizer
    assert tuned.model.config == base.model.config.replace(dropout=0.0)
    assert all(m.p == 0.0 for m in tuned.model.modules() if isinstance(m, torch.nn.Dropout))
    a, b = weights(base.model), weights(tuned.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    saved = json.loads((tmp_path / "tuned" / "last" / "config.json").read_text())
    assert saved["train"]["init_from"] == str(tmp_path / "base")


def test_init_from_a_hugging_face_directory(corpus, tmp_path, model_config) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    hf_tok = tokenizers.ByteLevelBPETokenizer()
    hf_tok.train_from_iterator(
        [corpus.read_text()], vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False
    )
    hf_tok.save(str(hf_dir / "tokenizer.json"))
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=hf_tok.get_vocab_size()
    )
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(hf_dir, safe_serialization=True)
    result = train(model_config, small(corpus, tmp_path / "run", max_steps=2), init_from=hf_dir)
    assert result.model.config.n_layer == 2 and result.model.config.block_size == 32
    assert result.tokenizer.encode("ROMEO:") == hf_tok.encode("ROMEO:").ids
    assert load_model(tmp_path / "run")[1] == result.tokenizer


def test_bad_settings_are_one_line_errors(corpus, tmp_path, model_config) -> None:
    with pytest.raises(ConfigError, match="--batch-size must be positive"):
        train(model_config, small(corpus, tmp_path / "a", batch_size=0))
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        train(model_config, small(corpus, tmp_path / "a", precision="fp8"))
    with pytest.raises(ConfigError, match="unknown tokenizer 'nope'"):
        train(model_config, small(corpus, tmp_path / "a", tokenizer="nope"))
    with pytest.raises(CheckpointError, match="nothing to resume in"):
        train(model_config, small(corpus, tmp_path / "empty"), resume=True)
    with pytest.raises(ConfigError, match="--resume and --init-from cannot be combined"):
        train(model_config, small(corpus, tmp_path / "a"), resume=True, init_from=tmp_path)


def test_loss_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 3.0, "val_loss": 3.1}\n{"step": 2, "loss": 2.')
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert write_loss_plot(metrics, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_loss_plot_with_matplotlib(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5, "val_loss": 2.7}\n')
    assert write_loss_plot(metrics, tmp_path / "loss.png") == str(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_drops_metrics_past_the_checkpoint_and_cut_lines(tmp_path) -> None:
    from gpt_core.metrics import append_metrics, read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n{"step": 3, "lo')
    truncate_metrics(path, 2)  # the crash cut step 3's line; the checkpoint is at step 2
    append_metrics(path, {"step": 3, "loss": 2.8})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    truncate_metrics(path, 1)
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n'
