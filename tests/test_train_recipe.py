"""The training recipe's choices: Muon, warmup-stable-decay, precision auto, and the old recipe
one flag away (old runs resume with the recipe they were saved with)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from test_train import assert_bitwise_equal, small, weights

from gpt_core import schedule
from gpt_core.checkpoint import resolve_checkpoint
from gpt_core.metrics import write_loss_plot
from gpt_core.train import Event, TrainConfig, train
from gpt_core.train_config import BEFORE_RECIPE_FIELDS, check_resume
from gptkit.cli import cli
from runtime.errors import ConfigError


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


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_model) -> None:
    adamw, muon = schedule.make_optimizers(
        tiny_model,
        optimizer="muon",
        lr=1e-3,
        muon_lr=0.02,
        weight_decay=0.1,
        betas=(0.9, 0.99),
        device=torch.device("cpu"),
    )
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    named = dict(tiny_model.named_parameters())
    for name, p in named.items():
        hidden = name.startswith("transformer.h.") and p.dim() == 2
        assert (id(p) in in_muon) == hidden, name
    # the embedding (tied to the head) stays with AdamW, decayed; gains and biases undecayed
    decayed, plain = adamw.param_groups
    assert any(p is tiny_model.transformer.wte.weight for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    counted = sum(p.numel() for o in (adamw, muon) for g in o.param_groups for p in g["params"])
    assert counted == tiny_model.num_params()
    schedule.set_learning_rate([adamw, muon], 0.5)
    assert muon.param_groups[0]["lr"] == 0.01 and decayed["lr"] == 0.0005


def test_adamw_alone_is_one_optimizer(tiny_model) -> None:
    (only,) = schedule.make_optimizers(
        tiny_model,
        optimizer="adamw",
        lr=1e-3,
        muon_lr=0.02,
        weight_decay=0.1,
        betas=(0.9, 0.99),
        device=torch.device("cpu"),
    )
    assert isinstance(only, torch.optim.AdamW)


def test_wsd_holds_the_peak_then_decays_linearly_to_the_floor() -> None:
    kw: dict[str, Any] = dict(
        lr=1.0, warmup_steps=10, min_lr_ratio=0.1, shape="wsd", decay_fraction=0.2
    )
    lrs = [schedule.learning_rate(s, 100, **kw) for s in range(101)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10:80] == [1.0] * 70  # stable
    assert lrs[80:] == pytest.approx([1.0 - 0.9 * k / 20 for k in range(21)])  # linear decay
    # a re-planned run keeps its current rate, then decays over the new end's last fifth
    restart = schedule.replan(50, 100, **kw)
    assert restart == (50, 1.0)
    longer = [schedule.learning_rate(s, 200, restart=restart, **kw) for s in range(50, 201)]
    assert longer[:110] == [1.0] * 110 and longer[-1] == pytest.approx(0.1)


def test_precision_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(schedule, "cpu_has_native_bf16", lambda: True)
    assert schedule.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(schedule, "cpu_has_native_bf16", lambda: False)
    assert schedule.resolve_precision("auto", cpu) == "fp32"
    assert schedule.resolve_precision("fp32", cpu) == "fp32"  # the old behaviour, one flag away
    assert isinstance(schedule.cpu_has_native_bf16.__call__(), bool)


def test_muon_wsd_bf16_run_resumes_bitwise(corpus, tmp_path, model_config) -> None:
    recipe = dict(
        optimizer="muon", muon_lr=0.01, lr_schedule="wsd", decay_fraction=0.5, precision="bf16"
    )
    straight = train(model_config, small(corpus, tmp_path / "straight", **recipe))

    def ctrl_c_at_step_7(event: Event) -> None:
        if event.kind == "step" and event.step == 7:
            import signal

            signal.raise_signal(signal.SIGINT)

    stopped = train(
        model_config, small(corpus, tmp_path / "split", **recipe), callback=ctrl_c_at_step_7
    )
    assert stopped.interrupted and stopped.step == 7
    resumed = train(None, TrainConfig(out_dir=str(tmp_path / "split"), threads=1), resume=True)
    assert resumed.step == 20
    assert_bitwise_equal(weights(straight.model), weights(resumed.model))
    # and Muon changed the run: AdamW alone ends elsewhere
    adamw = train(model_config, small(corpus, tmp_path / "adamw", lr_schedule="wsd"))
    assert not torch.equal(
        adamw.model.transformer.h[0].mlp.c_fc.weight,
        straight.model.transformer.h[0].mlp.c_fc.weight,
    )


def test_a_run_saved_before_the_recipe_fields_resumes_with_its_own_recipe(tmp_path) -> None:
    """A run saved without optimizer/lr_schedule trained with AdamW and a cosine: it keeps them
    whatever today's defaults are."""
    saved = {
        k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k not in BEFORE_RECIPE_FIELDS
    }
    assert saved["max_steps"] is None and saved["epochs"] is None  # the default length then
    kept = check_resume(tmp_path, {}, saved, None, TrainConfig())
    assert {k: kept[k] for k in BEFORE_RECIPE_FIELDS} == BEFORE_RECIPE_FIELDS
    assert kept["max_steps"] == 600  # that length, not today's DEFAULT_MAX_STEPS
    assert BEFORE_RECIPE_FIELDS["optimizer"] == "adamw"
    assert BEFORE_RECIPE_FIELDS["lr_schedule"] == "cosine"


def test_unknown_choices_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="unknown --optimizer 'sgd'; choose one of adamw, muon"):
        TrainConfig(optimizer="sgd").validate()
    with pytest.raises(ConfigError, match="unknown --lr-schedule 'linear'"):
        TrainConfig(lr_schedule="linear").validate()
    with pytest.raises(ConfigError, match="--muon-lr must be positive"):
        TrainConfig(muon_lr=0).validate()
    with pytest.raises(ConfigError, match="--decay-fraction must be between 0 and 1"):
        TrainConfig(decay_fraction=1.5).validate()


def test_cli_flags_reach_the_run_and_evals_show_elapsed_time(corpus, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--out", str(out), "--preset", "tiny"]
    args += ["--block-size", "32", "--max-steps", "4", "--eval-interval", "2", "--vocab-size"]
    args += ["300", "--batch-size", "4", "--optimizer", "muon", "--muon-lr", "0.01"]
    args += ["--lr-schedule", "wsd", "--precision", "fp32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((resolve_checkpoint(out / "last") / "config.json").read_text())["train"]
    assert (saved["optimizer"], saved["muon_lr"], saved["lr_schedule"]) == ("muon", 0.01, "wsd")
    eval_lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert len(eval_lines) == 2
    assert all(line.split(" at ")[-1].count(":") == 1 for line in eval_lines), eval_lines


def test_loss_plot_has_a_minutes_axis(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 3.0 / s, "elapsed_s": 30.0 * s} for s in range(1, 5)]
    rows[-1].update(val_loss=1.0)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib.pyplot as plt

    made: list[Any] = []
    real = plt.subplots
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt, "subplots", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
        assert write_loss_plot(metrics, tmp_path / "loss.png") == str(tmp_path / "loss.png")
    axes = made[0][1][0]
    assert [ax.get_xlabel() for ax in axes] == ["step", "minutes of training"]
    assert list(axes[1].lines[0].get_xdata()) == [0.5, 1.0, 1.5, 2.0]
