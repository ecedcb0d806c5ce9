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


# ---- directory exports --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, bpe_tokenizer) -> Path:
    from export.hf_export import export_hf

    torch.manual_seed(1234)
    model = GPT(GPTConfig.preset("tiny")).eval()
    directory = tmp_path_factory.mktemp("inspect-hf") / "model-hf"
    export_hf(model, bpe_tokenizer, directory, source="here", verify=False)
    return directory


@pytest.fixture(scope="module")
def genai_export(tmp_path_factory, exported) -> Path:
    """A genai folder as onnxruntime-genai reads it: the .onnx beside its genai_config.json."""
    directory = tmp_path_factory.mktemp("inspect-genai") / "model-genai"
    directory.mkdir()
    (directory / "model.onnx").write_bytes(exported.read_bytes())
    decoder = {
        "filename": "model.onnx",
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
    config = {
        "model": {
            "type": "decoder",
            "context_length": 64,
            "vocab_size": 512,
            "eos_token_id": 511,
            "bos_token_id": 511,
            "pad_token_id": 511,
            "decoder": decoder,
        },
        "search": {"max_length": 64, "past_present_share_buffer": False},
    }
    (directory / "genai_config.json").write_text(json.dumps(config))
    return directory


def test_hf_directory(runner, hf_export, bpe_tokenizer) -> None:
    result = runner.invoke(cli, ["inspect", str(hf_export)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.splitlines()[0].startswith(f"{hf_export}/: Hugging Face gpt2 directory, 0.5")
    assert "config:    n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=512" in out
    eot = bpe_tokenizer.eot_token
    assert (
        f"tokenizer: GPT2Tokenizer, {bpe_tokenizer.n_vocab} ids (special: <|endoftext|>={eot}), "
        "eos <|endoftext|>"
    ) in out
    assert "weights:   model.safetensors: 0.14M parameters in 28 tensors" in out
    assert "(F32 x28)" in out and "exported:  gptkit" in out and "from here" in out
    assert "  tokenizer.json" in out

    doc = json.loads(runner.invoke(cli, ["inspect", "--json", str(hf_export)]).stdout)
    assert doc["format"] == "hf" and doc["config"]["n_ctx"] == 64
    assert doc["tokenizer"]["n_vocab"] == bpe_tokenizer.n_vocab
    assert doc["tokenizer"]["special_tokens"] == {"<|endoftext|>": eot}
    assert doc["weights"]["dtypes"] == {"F32": 28}
    assert doc["weights"]["n_params"] == GPT(GPTConfig.preset("tiny")).num_params()
    assert doc["gptkit"]["config"] == GPTConfig.preset("tiny").to_dict()
    assert doc["size_bytes"] == sum(p.stat().st_size for p in hf_export.iterdir())


def test_genai_directory(runner, genai_export) -> None:
    result = runner.invoke(cli, ["inspect", str(genai_export)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.splitlines()[0].startswith(f"{genai_export}/: onnxruntime-genai directory")
    assert "genai:     type decoder, context 64, max_length 64" in out
    assert "past_present_share_buffer false, eos/bos/pad 511/511/511" in out
    assert "past_key_names=past_key_values.%d.key" in out
    assert "present_value_names=present.%d.value" in out
    # then the inner .onnx, as for a file
    assert f"{genai_export / 'model.onnx'}: " in out
    assert "kv_cache        concat" in out and "source          here" in out

    doc = json.loads(runner.invoke(cli, ["inspect", "--json", str(genai_export)]).stdout)
    assert doc["format"] == "genai" and doc["genai"]["past_present_share_buffer"] is False
    assert doc["model"]["export"]["kv_cache"] == "concat"
    assert doc["model"]["inputs"][0]["name"] == "input_ids"


def checkpoint_dir(path: Path, bpe_tokenizer) -> None:
    from gpt_core.checkpoint import save_model

    save_model(path, GPT(GPTConfig.preset("tiny")), bpe_tokenizer)


def corrupt_safetensors(path: Path, hf_export: Path) -> None:
    path.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((hf_export / name).read_bytes())
    (path / "model.safetensors").write_bytes(b"\xff" * 20)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("plain", "neither config.json (Hugging Face) nor genai_config.json"),
        ("checkpoint", "is a gptkit training checkpoint, not an export"),
        ("corrupt", "is not a readable safetensors file"),
        ("genai-without-model", "model.decoder.filename"),
    ],
)
def test_refuses_directories_that_are_not_exports(
    runner, tmp_path, hf_export, bpe_tokenizer, kind, message
) -> None:
    path = tmp_path / "dir"
    if kind == "plain":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    elif kind == "checkpoint":
        checkpoint_dir(path, bpe_tokenizer)
    elif kind == "corrupt":
        corrupt_safetensors(path, hf_export)
    else:
        path.mkdir()
        (path / "genai_config.json").write_text('{"model": {"decoder": {"filename": "x.onnx"}}}')
    result = runner.invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert "Traceback" not in result.output


def test_hf_directory_without_torch(hf_export) -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnxruntime'] = None\n"
        "from gptkit.cli import main\n"
        f"sys.argv = ['gptkit', 'inspect', {str(hf_export)!r}]\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "config:    n_layer=2" in done.stdout
