"""`gptkit export --format hf`: transformers loads the directory and agrees with gptkit.

Checked with transformers' own loaders: ``GPT2LMHeadModel.from_pretrained`` gives gptkit's logits
on a left-padded batch, ``AutoTokenizer.from_pretrained`` gives gptkit's ids on a corpus and on
random text, and gptkit's own ``--hf`` import of the directory gives back the weights bitwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given
from reliability_helpers import one_line_error, one_line_message
from runtime_helpers import TOKENIZER_TEXT as TEXT

from export.hf_export import TOLERANCE, export_hf
from gpt_core.bpe import train_bpe
from gpt_core.checkpoint import save_model
from gpt_core.config import GPTConfig
from gpt_core.hf import load_hf_gpt2
from gpt_core.model import GPT
from gptkit.cli import cli
from runtime.errors import ExportError, ParityError
from runtime.tokenizer import ENDOFTEXT, GPT2_PATTERN

SEED = 1234


def random_model(**overrides) -> GPT:
    """The tiny preset with every parameter random (normal 0.1), so a wrong bias, norm or
    transpose shows in the logits (the gpt2 init leaves biases 0 and norms 1)."""
    torch.manual_seed(SEED)
    model = GPT(GPTConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return random_model()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, bpe_tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "model-hf"
    result = export_hf(model, bpe_tokenizer, directory, source="test")
    assert result.max_logit_diff is not None and result.max_logit_diff <= result.tolerance
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_directory_layout(exported, model, bpe_tokenizer) -> None:
    names = sorted(p.name for p in exported.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    config = json.loads((exported / "config.json").read_text())
    cfg = model.config
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_layer"], config["n_head"], config["n_embd"]) == (2, 2, 64)
    assert config["n_positions"] == config["n_ctx"] == cfg.block_size
    assert config["vocab_size"] == cfg.vocab_size and config["activation_function"] == "gelu_new"
    assert config["bos_token_id"] == config["eos_token_id"] == bpe_tokenizer.eot_token
    assert config["tie_word_embeddings"] is True and config["gptkit"]["source"] == "test"
    tok_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == tok_config["bos_token"] == ENDOFTEXT
    assert tok_config["model_max_length"] == cfg.block_size
    from safetensors import safe_open

    with safe_open(exported / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied: stored once, as wte
        # Conv1D layout: (in, out), the transpose of nn.Linear's weight
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (64, 192)
    assert keys == set(model.state_dict()) - {"lm_head.weight"}


def test_transformers_logits_match_on_a_left_padded_batch(exported, model) -> None:
    hf = transformers.GPT2LMHeadModel.from_pretrained(exported, local_files_only=True).eval()
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)  # tied on load
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (3, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :19] = 0  # one real token
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions).logits
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    diff = float((ours[real] - theirs[real]).abs().max())
    print(f"max |logit diff| vs transformers: {diff:.2e}")
    assert diff <= TOLERANCE
    # and greedy generation agrees token for token
    prompt = ids[:1, :5]
    ours_gen = model.generate(prompt, 12, temperature=0)
    theirs_gen = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours_gen.tolist() == theirs_gen.tolist()


def test_tokenizer_ids_match_on_the_corpus(hf_tokenizer, bpe_tokenizer, shakespeare) -> None:
    text = shakespeare[:300_000] + " café 世界 😀\t\r\n  'll  " + ENDOFTEXT + " x"
    # transformers maps special-token text to its id: gptkit's allow_special=True
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == bpe_tokenizer.encode(text, allow_special=True)
    assert bpe_tokenizer.eot_token in ids
    # gptkit's default (special text as plain text) is transformers' split_special_tokens=True
    plain = hf_tokenizer(text, split_special_tokens=True)["input_ids"]
    assert plain == bpe_tokenizer.encode(text) and bpe_tokenizer.eot_token not in plain
    assert hf_tokenizer.decode(ids) == text == bpe_tokenizer.decode(ids)
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == bpe_tokenizer.eot_token


@given(text=TEXT)
def test_tokenizer_ids_match_on_random_text(hf_tokenizer, bpe_tokenizer, text: str) -> None:
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == bpe_tokenizer.encode(text, allow_special=True)
    assert hf_tokenizer.decode(ids) == bpe_tokenizer.decode(ids)


def test_other_split_patterns_survive(tmp_path, shakespeare) -> None:
    """A non-GPT-2 pattern is written as Split(regex) + ByteLevel and still encodes the same."""
    pattern = GPT2_PATTERN.replace(r" ?\p{N}++", r"\p{N}")  # digits one at a time
    tok = train_bpe([shakespeare[:16_000]], 400, name="digits", pattern=pattern)
    from export.hf_tokenizer import write_hf_tokenizer

    written = write_hf_tokenizer(tok, tmp_path)
    assert all(path.is_file() for path in written)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = shakespeare[:50_000] + " 12345 and 1.5e10"
    assert hf(text)["input_ids"] == tok.encode(text, allow_special=True)


def test_hf_import_gives_back_the_same_weights(exported, model, bpe_tokenizer) -> None:
    imported, tokenizer = load_hf_gpt2(exported)
    ours, theirs = model.state_dict(), imported.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert imported.config == model.config.replace(dropout=0.0)
    assert tokenizer.mergeable_ranks == bpe_tokenizer.mergeable_ranks
    assert tokenizer.special_tokens == bpe_tokenizer.special_tokens
    assert tokenizer.pattern == bpe_tokenizer.pattern


def test_bias_free_models_are_refused(tmp_path, bpe_tokenizer) -> None:
    with pytest.raises(ExportError) as error:
        export_hf(random_model(bias=False), bpe_tokenizer, tmp_path / "out")
    assert "bias=False" in one_line_message(error)
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_leaves_the_previous_export(
    tmp_path, model, bpe_tokenizer, monkeypatch
) -> None:
    out = tmp_path / "model-hf"
    export_hf(model, bpe_tokenizer, out, verify=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("export.hf_export.TOLERANCE", -1.0)
    with pytest.raises(ParityError) as error:
        export_hf(random_model(n_layer=1), bpe_tokenizer, out)
    assert f"{out} not written" in one_line_message(error)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_without_transformers_the_result_says_so(
    tmp_path, model, bpe_tokenizer, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    result = export_hf(model, bpe_tokenizer, tmp_path / "out")
    assert result.max_logit_diff is None
    assert "transformers is not installed" in result.parity_line()
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, bpe_tokenizer) -> Path:
    return save_model(tmp_path_factory.mktemp("ckpt") / "step-000010", model, bpe_tokenizer)


def test_cli_exports_and_replaces_its_own_export(runner, checkpoint, tmp_path, model) -> None:
    out = tmp_path / "hf"
    for _ in range(2):  # the second run replaces the first export
        result = runner.invoke(
            cli, ["export", str(out), "--format", "hf", "--checkpoint", str(checkpoint)]
        )
        assert result.exit_code == 0, result.output
        assert "Parity with transformers: logits max |diff|" in result.stdout
        assert "tokenizer ids identical" in result.stdout
        assert f"Wrote {out}/: 8 files" in result.stdout and "model.safetensors" in result.stdout
    assert leftovers(tmp_path) == []
    imported, _ = load_hf_gpt2(out)
    assert torch.equal(imported.lm_head.weight, model.lm_head.weight)

    shown = runner.invoke(cli, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "Hugging Face gpt2 directory" in shown.stdout
    assert "tokenizer: GPT2Tokenizer" in shown.stdout and "exported:  gptkit" in shown.stdout


def test_cli_default_output_is_model_hf(runner, checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["export", "--format", "hf", "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model-hf" / "config.json").is_file()
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--dtype", "fp16"], ["--dtype does not apply to --format hf"]),
        (["--quantize", "int8", "--optimize"], ["--quantize, --optimize do not apply"]),
        (["--kv-cache", "inplace"], ["--kv-cache does not apply"]),
        (["--opset", "18"], ["--opset does not apply"]),
    ],
)
def test_cli_onnx_flags_are_usage_errors(runner, checkpoint, tmp_path, args, fragments) -> None:
    out = tmp_path / "hf"
    cmd = ["export", str(out), "--format", "hf", "--checkpoint", str(checkpoint), *args]
    one_line_error(runner.invoke(cli, cmd), *fragments, code=2)
    assert not out.exists()


def test_cli_onnx_file_name_is_a_usage_error(runner, checkpoint, tmp_path) -> None:
    out = tmp_path / "model.onnx"
    cmd = ["export", str(out), "--format", "hf", "--checkpoint", str(checkpoint)]
    one_line_error(runner.invoke(cli, cmd), "writes a directory", code=2)
    assert not out.exists()


def test_cli_refuses_to_replace_other_directories(runner, checkpoint, tmp_path) -> None:
    """A non-empty folder that is not our export (here: the checkpoint itself) is never replaced."""
    before = sorted(p.name for p in checkpoint.iterdir())
    cmd = ["export", str(checkpoint), "--format", "hf", "--checkpoint", str(checkpoint)]
    one_line_error(runner.invoke(cli, cmd), "is not empty and is not a gptkit Hugging Face export")
    assert sorted(p.name for p in checkpoint.iterdir()) == before

    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    cmd = ["export", str(a_file), "--format", "hf", "--checkpoint", str(checkpoint)]
    one_line_error(runner.invoke(cli, cmd), "is a file")
    assert a_file.read_text() == "keep me"

    cmd = [
        "export",
        str(tmp_path / "no" / "dir"),
        "--format",
        "hf",
        "--checkpoint",
        str(checkpoint),
    ]
    one_line_error(runner.invoke(cli, cmd), "does not exist")


def test_cli_bias_free_checkpoint(runner, tmp_path, bpe_tokenizer) -> None:
    ckpt = save_model(tmp_path / "nobias", random_model(bias=False), bpe_tokenizer)
    cmd = ["export", str(tmp_path / "hf"), "--format", "hf", "--checkpoint", str(ckpt)]
    one_line_error(runner.invoke(cli, cmd), "bias=False", "export it as ONNX instead")
    assert not (tmp_path / "hf").exists()
