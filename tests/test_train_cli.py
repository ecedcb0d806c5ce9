"""`gptkit train`: the flag names scripts rely on, a tiny run, config files, Ctrl-C, one-line errors."""

from __future__ import annotations

import json
import signal

import pytest
from click.testing import CliRunner, Result
from reliability_helpers import one_line_error as shared_one_line_error

from gpt_core.checkpoint import load_model
from gpt_core.train_config import (
    DEFAULT_MAX_STEPS,
    DEFAULT_PRESET,
    DEFAULT_RUN_DIR,
    PRECISIONS,
    TrainConfig,
)
from gptkit import train_cmd
from gptkit.cli import cli

DOCUMENTED_FLAGS = (
    "--data --out --preset --config --n-layer --n-head --n-embd --block-size --batch-size "
    "--grad-accum --lr --epochs --max-steps --eval-interval --precision --device --seed "
    "--tokenizer --vocab-size --resume --init-from --log"
).split()
TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--vocab-size", "300"]


pytestmark = pytest.mark.usefixtures("isolated_dirs")


def one_line_error(result: Result, *fragments: str) -> str:
    """The command printed exactly one ``Error: ...`` line holding every fragment."""
    return shared_one_line_error(result, *fragments, only=True)


def test_help_lists_the_documented_flags(runner) -> None:
    result = runner.invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for flag in DOCUMENTED_FLAGS:
        assert f"{flag} " in result.output or f"{flag}\n" in result.output, flag


def test_help_shows_the_library_defaults(runner: CliRunner) -> None:
    """--help reads its defaults and choices from the library; the CLI keeps no copies."""
    result = runner.invoke(cli, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    defaults = TrainConfig()
    assert defaults.out_dir == str(DEFAULT_RUN_DIR)
    for flag, value in [
        ("--out", DEFAULT_RUN_DIR),
        ("--preset", DEFAULT_PRESET),
        ("--max-steps", DEFAULT_MAX_STEPS),
        ("--batch-size", defaults.batch_size),
        ("--lr", defaults.lr),
        ("--vocab-size", defaults.vocab_size),
        ("--seed", defaults.seed),
    ]:
        line = next(line for line in result.output.splitlines() if line.strip().startswith(flag))
        assert f"[default: {value}" in line, line
    assert f"[{'|'.join(PRECISIONS)}]" in result.output
    assert not any(hasattr(train_cmd, name) for name in ("DEFAULT_OUT", "DEFAULT_STEPS"))


@pytest.mark.slow
def test_no_data_trains_on_the_bundled_corpus_into_the_default_run(runner) -> None:
    result = runner.invoke(cli, ["train", *TINY, "--max-steps", "2", "--eval-interval", "2"])
    assert result.exit_code == 0, result.output
    assert "Training " in result.output and "--- sample ---" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"Saved to {DEFAULT_RUN_DIR / 'best'}") and "bits/char" in last
    model, tokenizer = load_model()  # where `gptkit export` looks by default
    assert model.config.n_layer == 2 and tokenizer.n_vocab <= 300
    assert (DEFAULT_RUN_DIR / "metrics.jsonl").is_file()


def test_flags_and_config_file_reach_the_run(runner, corpus, tmp_path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": {"n_embd": 32}, "train": {"lr": 0.003}, "seed": 5}))
    args = ["train", "--data", str(corpus), "--out", "r", *TINY, "--config", str(config)]
    args += ["--n-layer", "1", "--n-head", "4", "--max-steps", "3", "--eval-interval", "3"]
    args += ["--grad-accum", "2", "--precision", "fp32", "--device", "cpu"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r" / "last" / "config.json").read_text())
    assert (saved["model"]["n_layer"], saved["model"]["n_head"], saved["model"]["n_embd"]) == (
        1,
        4,
        32,
    )
    train = saved["train"]
    assert (train["lr"], train["seed"], train["grad_accum"], train["max_steps"]) == (
        0.003,
        5,
        2,
        3,
    )
    assert train["data"] == [str(corpus)] and train["vocab_size"] == 300


def test_ctrl_c_prints_how_to_resume_and_resume_finishes(runner, corpus, monkeypatch) -> None:
    display = train_cmd._Display.__call__

    def ctrl_c_at_step_2(self, event) -> None:
        display(self, event)
        if event.kind == "step" and event.step == 2:
            signal.raise_signal(signal.SIGINT)

    args = ["train", "--data", str(corpus), "--out", "r", *TINY, "--max-steps", "4"]
    with monkeypatch.context() as patch:
        patch.setattr(train_cmd._Display, "__call__", ctrl_c_at_step_2)
        result = runner.invoke(cli, args)
    assert result.exit_code == 130, result.output
    assert "Interrupted at step 2; checkpoint saved in r/last" in result.output
    assert "Resume with: gptkit train --out r --resume" in result.output
    result = runner.invoke(cli, ["train", "--out", "r", "--resume"])
    assert result.exit_code == 0, result.output
    assert "4 steps" in result.output.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--data", "missing.txt"], ["missing.txt does not exist"]),
        (["--resume"], ["nothing to resume in runs/default"]),
        (["--precision", "fp16", "--device", "cpu"], ["fp16 needs a CUDA GPU"]),
        (["--n-embd", "30", "--n-head", "4"], ["n_embd (30) must be divisible by n_head (4)"]),
        (["--preset", "huge"], ["unknown preset 'huge'"]),
        (["--config", "nope.json"], ["config file nope.json not found"]),
        (["--init-from", "nowhere"], ["no checkpoint at nowhere"]),
        (["--tokenizer", "sentencepiece"], ["unknown tokenizer 'sentencepiece'"]),
    ],
    ids=["data", "resume", "fp16", "shape", "preset", "config", "init-from", "tokenizer"],
)
def test_user_mistakes_are_one_line_errors(runner, args, fragments) -> None:
    one_line_error(runner.invoke(cli, ["train", "--max-steps", "1", *args]), *fragments)


def test_undecodable_data_and_bad_config_files(runner, tmp_path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\n\xff\xfe")
    result = runner.invoke(cli, ["train", "--data", str(bad), "--tokenizer", "gpt2x"])
    one_line_error(result, "unknown tokenizer")
    result = runner.invoke(cli, ["train", "--data", str(bad), *TINY])
    one_line_error(result, f"{bad} is not UTF-8 text (invalid byte at offset 4)")
    config = tmp_path / "c.json"
    config.write_text('{"n_layers": 3}')
    one_line_error(
        runner.invoke(cli, ["train", "--config", str(config)]), "unknown key(s): n_layers"
    )
    config.write_text("[1, 2")
    one_line_error(runner.invoke(cli, ["train", "--config", str(config)]), "not valid JSON")


def test_resume_and_init_from_together_is_a_one_line_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["train", "--resume", "--init-from", "x"])
    one_line_error(result, "--resume and --init-from cannot be combined")


def test_config_file_fields_yield_to_flags(runner, corpus, tmp_path) -> None:
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps({"data": str(corpus), "out_dir": "from-file", "max_steps": 2, "seed": 3})
    )
    result = runner.invoke(cli, ["train", *TINY, "--config", str(config), "--seed", "4"])
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "from-file" / "last" / "config.json").read_text())["train"]
    assert (train["data"], train["seed"], train["max_steps"]) == ([str(corpus)], 4, 2)
    config.write_text(json.dumps({"train": {"lr": "fast"}}))
    one_line_error(
        runner.invoke(cli, ["train", "--config", str(config)]),
        "training field lr must be a number, got 'fast'",
    )


def test_resume_refuses_a_different_shape(runner, corpus) -> None:
    args = ["train", "--data", str(corpus), "--out", "r", *TINY, "--max-steps", "2"]
    assert runner.invoke(cli, args).exit_code == 0
    result = runner.invoke(cli, ["train", "--out", "r", "--resume", "--n-embd", "128"])
    one_line_error(result, "the run in r has n_embd 64, not 128", "--init-from r")
    result = runner.invoke(cli, ["train", "--out", "r", "--resume", "--max-steps", "2"])
    assert result.exit_code == 0 and "re-planned" not in result.output  # the same end: done
    result = runner.invoke(cli, ["train", "--out", "r", "--resume", "--max-steps", "1"])
    one_line_error(result, "the run in r is at step 2; --max-steps 1 does not go past it")
    result = runner.invoke(cli, ["train", "--out", "r", "--resume", "--block-size", "32"])
    assert result.exit_code == 0, result.output  # the same value is fine


def test_resume_with_more_steps_continues_a_finished_run(runner, corpus) -> None:
    args = ["train", "--data", str(corpus), "--out", "r", *TINY, "--max-steps", "4"]
    assert runner.invoke(cli, [*args, "--eval-interval", "2"]).exit_code == 0
    result = runner.invoke(cli, ["train", "--out", "r", "--resume", "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    replan = [line for line in result.output.splitlines() if "re-planned" in line]
    assert replan == [
        "Continuing the run from step 4 to step 6 (it was to end at 4): learning rate "
        "re-planned from 2.00e-04 down to the floor at the new end"
    ]
    assert "6 steps" in result.output.strip().splitlines()[-1]
    steps = [json.loads(line)["step"] for line in open("r/metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_init_from_refuses_another_shape_but_takes_dropout(runner, corpus) -> None:
    args = ["train", "--data", str(corpus), "--out", "base", *TINY, "--max-steps", "1"]
    assert runner.invoke(cli, args).exit_code == 0
    tune = ["train", "--data", str(corpus), "--out", "tuned", "--max-steps", "1"]
    result = runner.invoke(cli, [*tune, "--init-from", "base", "--n-embd", "128"])
    one_line_error(result, "--init-from base has n_embd 64, not 128", "drop --n-embd")
    result = runner.invoke(cli, [*tune, "--init-from", "base", "--preset", "small-cpu"])
    one_line_error(result, "--init-from base has n_layer 2, not 4")
    result = runner.invoke(cli, [*tune, "--init-from", "base", "--dropout", "0.2"])
    assert result.exit_code == 0, result.output
    assert load_model("tuned")[0].config.dropout == 0.2
