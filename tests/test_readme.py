"""The README is the front door: its examples must work as written.

- every `gptkit ...` command line shown in a bash block parses against the real CLI (so a renamed
  or removed flag fails here, not on a user's machine);
- the embedding example (the python block) runs against a real exported model.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click
import pytest

from gptkit.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _gptkit_commands() -> list[str]:
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if " | " in line:
                line = line.split(" | ")[-1]
            if line.startswith("gptkit"):
                commands.append(line)
            elif "-m gptkit " in line:  # torchrun ... -m gptkit train
                commands.append("gptkit " + line.split("-m gptkit ", 1)[1])
    return commands


def test_readme_shows_the_three_commands():
    shown = {c.split()[1] for c in _gptkit_commands() if len(c.split()) > 1}
    assert {"train", "export", "run"} <= shown


@pytest.mark.parametrize("command", _gptkit_commands())
def test_readme_command_parses(command: str):
    """Parse (not run) each command: unknown options or bad values raise a click UsageError."""
    args = shlex.split(command.replace("$'\\n\\n'", "STOP"))[1:]
    if not args:
        return  # bare `gptkit`: the whole pipeline
    name, rest = args[0], args[1:]
    group_ctx = click.Context(cli, info_name="gptkit")
    sub = cli.get_command(group_ctx, name)
    assert sub is not None, f"unknown command in README: {command}"
    try:
        sub.make_context(name, rest, parent=group_ctx)
    except click.UsageError as e:
        pytest.fail(f"README command does not parse: {command}: {e}")


@pytest.mark.torch
def test_readme_embedding_example_runs(tmp_path, monkeypatch, capsys, bpe_tokenizer):
    """Against a tiny model with the default small-cpu context (128), as `gptkit train` makes."""
    import torch

    from export.onnx_export import export_onnx
    from gpt_core.config import GPTConfig
    from gpt_core.model import GPT

    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", vocab_size=bpe_tokenizer.n_vocab, block_size=128)
    export_onnx(GPT(config), bpe_tokenizer, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    (source,) = [b for b in _blocks("python") if "runtime.load" in b]
    exec(compile(source, str(README) + ":embed", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "top_p" in out  # the except branch printed the one-line error
    assert os.path.exists("model.onnx")
