"""`gptkit` with no arguments chains train -> export model.onnx -> run (here with a tiny budget)."""

from __future__ import annotations

import pytest

from gptkit.cli import cli
from gptkit.train_cmd import train_command

pytestmark = pytest.mark.torch  # the CLI modules import torch only when the chain trains

TINY_RUN = {
    "preset": "tiny",
    "max_steps": 12,
    "eval_interval": 12,
    "vocab_size": 300,
    "batch_size": 4,
    "block_size": 32,
}


@pytest.mark.slow  # trains, exports and runs
def test_no_arguments_trains_exports_and_runs(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    for param in train_command.params:  # shrink the defaults the chain trains with
        if param.name in TINY_RUN:
            monkeypatch.setattr(param, "default", TINY_RUN[param.name])
    result = runner.invoke(cli, [])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "default" / "best" / "model.safetensors").exists()
    assert (tmp_path / "model.onnx").stat().st_size > 0
    assert "parity" in result.output.lower() and "tokens in" in result.stderr
    assert result.stdout.strip(), "the run step printed no continuation"
