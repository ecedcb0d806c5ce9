"""`gptkit inspect`: prints what an export carries, works without PyTorch, refuses foreign files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from export import ExportOptions, export_onnx
from gpt_core.config import GPTConfig
from gpt_core.model import GPT
from gptkit.cli import cli


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bpe_tokenizer) -> Path:
    torch.manual_seed(1234)
    model = GPT(GPTConfig.preset("tiny")).eval()
    path = tmp_path_factory.mktemp("inspect") / "tiny.onnx"
    export_onnx(model, bpe_tokenizer, path, options=ExportOptions(optimize=True), source="here")
    return path


def test_prints_config_tokenizer_export_and_io(runner, exported, bpe_tokenizer) -> None:
    result = runner.invoke(cli, ["inspect", str(exported)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    size_mb = f"{exported.stat().st_size / 1e6:.2f} MB"
    assert out.splitlines()[0] == f"{exported}: {size_mb}"
    assert "config:    n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512" in out
    assert f"tokenizer: test-bpe, {bpe_tokenizer.n_vocab} ids (special: <|endoftext|>=" in out
    assert "logits          all" in out and "opset           18" in out
    assert "fusions         FastGelu x2, SkipLayerNormalization x5" in out
    assert "source          here" in out
    assert "input_ids                    int64    [batch_size, sequence_length]" in out
    assert "past_key_values.1.value      float32  [batch_size, 2, past_sequence_length, 32]" in out
    assert "present.0.key                float32  [batch_size, 2, total_sequence_length, 32]" in out
    assert "logits                       float32  [batch_size, sequence_length, 512]" in out


def test_json_output(runner, exported, bpe_tokenizer) -> None:
    result = runner.invoke(cli, ["inspect", "--json", str(exported)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["config"] == GPTConfig.preset("tiny").to_dict()
    assert doc["tokenizer"]["n_vocab"] == bpe_tokenizer.n_vocab
    assert doc["tokenizer"]["pattern"] == bpe_tokenizer.pattern
    assert doc["export"]["logits"] == "all" and doc["export"]["optimize"] is True
    assert [i["name"] for i in doc["inputs"]][:4] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
    ]
    assert [o["name"] for o in doc["outputs"]][:2] == ["logits", "present.0.key"]
    assert doc["size_bytes"] == exported.stat().st_size


def foreign_onnx(path: Path) -> None:
    """A valid ONNX model that gptkit did not export (no metadata)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, path)


def garbage(path: Path) -> None:
    path.write_bytes(b"not a model")


def empty(path: Path) -> None:
    path.write_bytes(b"")


def missing(path: Path) -> None:
    pass


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (foreign_onnx, "has no gptkit metadata"),
        (garbage, "is not a readable ONNX model"),
        (empty, "is empty"),
        (missing, "not found"),
    ],
    ids=["foreign", "garbage", "empty", "missing"],
)
def test_refuses_files_that_are_not_gptkit_exports(runner, tmp_path, make, message) -> None:
    path = tmp_path / "other.onnx"
    make(path)
    result = runner.invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert "Traceback" not in result.output


def test_works_without_torch(exported) -> None:
    """inspect never imports torch: run it in a process where importing torch fails."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from gptkit.cli import main\n"
        f"sys.argv = ['gptkit', 'inspect', {str(exported)!r}]\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "config:    n_layer=2" in done.stdout
