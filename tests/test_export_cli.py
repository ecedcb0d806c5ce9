"""`gptkit export`: checkpoints in, one verified .onnx out, one-line errors for every user mistake."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from reliability_helpers import one_line_error

from gpt_core.checkpoint import save_checkpoint, save_model
from gpt_core.config import GPTConfig
from gpt_core.model import GPT
from gptkit.cli import cli
from runtime.metadata import ModelMetadata

SEED = 1234


def make_model() -> GPT:
    torch.manual_seed(SEED)
    return GPT(GPTConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bpe_tokenizer) -> Path:
    return save_model(tmp_path_factory.mktemp("ckpt") / "step-000010", make_model(), bpe_tokenizer)


def metadata(path: Path) -> ModelMetadata:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_export_from_checkpoint(runner, checkpoint, tmp_path) -> None:
    out = tmp_path / "tiny.onnx"
    result = runner.invoke(cli, ["export", str(out), "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    stdout = result.stdout
    assert "Parity with PyTorch (fp32, tolerance 0.0001)" in stdout
    assert "logits (prompt)" in stdout and "present.* (decode step 4)" in stdout
    assert "OVER" not in stdout and "greedy 16/16 tokens identical" in stdout
    assert f"Wrote {out}: 0.5" in stdout and "MB of fp32 parameters, opset 18, fp32" in stdout
    assert "input_ids" in stdout and "int64 [batch_size, sequence_length]" in stdout
    assert "past_key_values.{0..1}.key|value" in stdout and "present.{0..1}.key|value" in stdout
    assert "float32 [batch_size, 2, past_sequence_length, 32]" in stdout
    meta = metadata(out)
    assert meta.export["source"] == str(checkpoint.resolve())
    assert meta.config == make_model().config.to_dict()
    assert leftovers(tmp_path) == []


def test_default_run_and_output(runner, bpe_tokenizer, tmp_path, monkeypatch) -> None:
    """No arguments: runs/default's best checkpoint -> ./model.onnx (what `gptkit` alone does)."""
    monkeypatch.chdir(tmp_path)
    run = Path("runs") / "default"
    save_checkpoint(run, 5, make_model(), bpe_tokenizer, train_config={}, state=None, is_best=True)
    result = runner.invoke(cli, ["export"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.onnx").is_file()
    assert metadata(tmp_path / "model.onnx").export["source"].endswith("step-000005")


@pytest.mark.slow  # two exports, quantized and optimized
def test_variants_from_the_command_line(runner, checkpoint, tmp_path) -> None:
    int8 = tmp_path / "int8.onnx"
    result = runner.invoke(
        cli,
        ["export", str(int8), "--checkpoint", str(checkpoint), "--quantize", "int8", "--optimize"],
    )
    assert result.exit_code == 0, result.output
    assert "Parity with PyTorch (int8, tolerance 1)" in result.stdout
    assert "optimize: fused FastGelu x2, SkipLayerNormalization x5" in result.stdout
    assert "the token lookup reads the head's int8 weight (embedding stored once)" in result.stdout
    assert metadata(int8).export["quantize"] == "int8"

    fp16 = tmp_path / "fp16.onnx"
    result = runner.invoke(
        cli, ["export", str(fp16), "--checkpoint", str(checkpoint), "--dtype", "fp16"]
    )
    assert result.exit_code == 0, result.output
    assert "Parity with PyTorch (fp16, tolerance 0.2)" in result.stdout
    assert "float16 [batch_size, 2, past_sequence_length, 32]" in result.stdout
    assert metadata(fp16).export["dtype"] == "fp16"


def test_missing_default_checkpoint(runner, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["export"])
    one_line_error(result, "no checkpoint at runs/default", "gptkit train")
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_directory(runner, tmp_path) -> None:
    result = runner.invoke(cli, ["export", str(tmp_path / "m.onnx"), "--checkpoint", "nowhere"])
    one_line_error(result, "no checkpoint at nowhere")


def test_corrupt_checkpoint(runner, checkpoint, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoint.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "m.onnx"
    result = runner.invoke(cli, ["export", str(out), "--checkpoint", str(broken)])
    one_line_error(result, "corrupt or truncated")
    assert not out.exists()

    (broken / "config.json").write_text("{not json")
    result = runner.invoke(cli, ["export", str(out), "--checkpoint", str(broken)])
    one_line_error(result, "config.json is not valid JSON")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--dtype", "fp16", "--quantize", "int8"], ["cannot be combined"]),
        (["--opset", "9"], ["opset 9 is not supported", "18..20"]),
        (["--opset", "21"], ["opset 21 is not supported"]),
    ],
)
def test_unsupported_options(runner, checkpoint, tmp_path, args, fragments) -> None:
    out = tmp_path / "m.onnx"
    result = runner.invoke(cli, ["export", str(out), "--checkpoint", str(checkpoint), *args])
    one_line_error(result, *fragments)
    assert not out.exists()


def test_checkpoint_and_hf_together_is_a_usage_error(runner, checkpoint, tmp_path) -> None:
    result = runner.invoke(cli, ["export", "--checkpoint", str(checkpoint), "--hf", str(tmp_path)])
    assert result.exit_code == 2
    assert "either --checkpoint or --hf" in result.stderr


def test_output_is_a_directory(runner, checkpoint, tmp_path) -> None:
    result = runner.invoke(cli, ["export", str(tmp_path), "--checkpoint", str(checkpoint)])
    one_line_error(result, "is a directory")


def test_output_directory_missing(runner, checkpoint, tmp_path) -> None:
    out = tmp_path / "no" / "such" / "m.onnx"
    result = runner.invoke(cli, ["export", str(out), "--checkpoint", str(checkpoint)])
    one_line_error(result, "does not exist")


def test_parity_failure_writes_nothing(runner, checkpoint, tmp_path, monkeypatch) -> None:
    """Over tolerance: exit 1 naming every failing output; the good file already there stays."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous good export")
    monkeypatch.setitem(__import__("export.parity").parity.TOLERANCES, "fp32", 1e-12)
    result = runner.invoke(cli, ["export", str(out), "--checkpoint", str(checkpoint)])
    one_line_error(result, "parity check failed", f"{out} not written")
    error = result.stderr.strip().splitlines()[-1]
    for name in ("logits (prompt)", "present.* (prompt)", "logits (decode step 4)"):
        assert name in error
    assert "OVER" in result.stdout
    assert out.read_bytes() == b"the previous good export"
    assert leftovers(tmp_path) == []


def write_hf_gpt2(directory: Path, text: str) -> None:
    """A tiny random Hugging Face GPT-2 folder (safetensors + tokenizer.json), as transformers saves."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    hf_tok = tokenizers.ByteLevelBPETokenizer()
    hf_tok.train_from_iterator([text], vocab_size=400, show_progress=False)
    hf_tok.add_special_tokens(["<|endoftext|>"])
    directory.mkdir()
    hf_tok.save(str(directory / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=hf_tok.get_vocab_size()
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)


@pytest.mark.slow  # builds a transformers GPT-2, then exports it
def test_export_from_hugging_face(runner, tmp_path, shakespeare) -> None:
    hf_dir = tmp_path / "hf-gpt2"
    write_hf_gpt2(hf_dir, shakespeare[:16_000])
    out = tmp_path / "hf.onnx"
    result = runner.invoke(cli, ["export", str(out), "--hf", str(hf_dir)])
    assert result.exit_code == 0, result.output
    assert "OVER" not in result.stdout
    meta = metadata(out)
    assert meta.export["source"] == f"hf:{hf_dir}"
    assert (
        meta.n_layer == 2
        and meta.tokenizer.n_vocab == json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    )


def test_missing_hf_directory(runner, tmp_path) -> None:
    result = runner.invoke(cli, ["export", str(tmp_path / "m.onnx"), "--hf", str(tmp_path / "x")])
    one_line_error(result, "is not a directory")
