"""`export_genai`: a folder onnxruntime-genai opens as it is, proven with genai's own code.

The hand-off test loads the folder with ``og.Model`` and ``og.Tokenizer``, generates greedily
and compares with gptkit's runtime on the same ``model.onnx``, for both cache kinds. It needs
``onnxruntime-genai`` (the dev and bench extras) and is skipped with that reason without it; the
config and target-handling tests run either way.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import runtime
from export import genai_export
from export.genai_export import CONFIG_FILE, MODEL_FILE, export_genai, genai_config
from export.hf_tokenizer import TOKENIZER_FILES
from export.options import ExportOptions
from runtime import onnx_contract as contract
from runtime.errors import ExportError, ParityError
from runtime.metadata import KEY_FORMAT

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
needs_genai = pytest.mark.skipif(
    not HAS_GENAI, reason="onnxruntime-genai not installed (pip install 'gptkit[dev]')"
)
PROMPT = "ROMEO: What say you, my lord?"
NEW_TOKENS = 24
SEED = 1234
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 512}


def test_config_names_come_from_the_onnx_contract() -> None:
    doc = genai_config(TINY, eos_token_id=511, kv_cache=contract.KV_CONCAT)
    decoder = doc["model"]["decoder"]
    assert doc["model"]["type"] == "decoder"
    assert decoder["inputs"]["past_key_names"] % 3 == contract.PAST_KEY.format(3)
    assert decoder["inputs"]["past_value_names"] % 0 == contract.PAST_VALUE.format(0)
    assert decoder["outputs"]["present_key_names"] % 1 == contract.PRESENT_KEY.format(1)
    assert decoder["outputs"]["present_value_names"] % 1 == contract.PRESENT_VALUE.format(1)
    io = {**decoder["inputs"], **decoder["outputs"]}
    assert {io["input_ids"], io["attention_mask"], io["position_ids"], io["logits"]} == {
        contract.INPUT_IDS,
        contract.ATTENTION_MASK,
        contract.POSITION_IDS,
        contract.LOGITS,
    }
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_hidden_layers"]) == (
        32,
        64,
        2,
    )
    assert decoder["num_attention_heads"] == decoder["num_key_value_heads"] == 2
    assert doc["model"]["context_length"] == doc["search"]["max_length"] == 64
    ids = [doc["model"][k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    assert ids == [511, 511, 511]


def test_share_buffer_only_for_inplace_exports() -> None:
    share = {
        kv: genai_config(TINY, eos_token_id=0, kv_cache=kv)["search"]["past_present_share_buffer"]
        for kv in contract.KV_CACHE_MODES
    }
    assert share == {contract.KV_CONCAT: False, contract.KV_INPLACE: True}
    with pytest.raises(ExportError):
        genai_config(TINY, eos_token_id=0, kv_cache="ring")


def _fake_export_onnx(fail: bool = False) -> Any:
    """Stands in for the tracer: writes a file ending in gptkit's metadata (or fails parity)."""

    def fake(model: Any, tokenizer: Any, path: Path, **kwargs: Any) -> SimpleNamespace:
        if fail:
            raise ParityError("parity check failed", None)
        Path(path).write_bytes(b"\0" * 64 + KEY_FORMAT.encode())
        return SimpleNamespace(notes=[], parity=None)

    return fake


def test_replaces_a_previous_export_and_refuses_other_folders(
    tmp_path: Path, tiny_model: Any, bpe_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("export.onnx_export.export_onnx", _fake_export_onnx())
    target = tmp_path / "out"
    first = export_genai(tiny_model, bpe_tokenizer, target)
    assert first.path == target
    assert {MODEL_FILE, CONFIG_FILE, *TOKENIZER_FILES} == {p.name for p in target.iterdir()}
    assert genai_export.is_genai_export(target)
    export_genai(tiny_model, bpe_tokenizer, target)  # a previous export is replaced
    assert genai_export.is_genai_export(target)

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(
        ExportError, match="not empty and is not a gptkit onnxruntime-genai export"
    ) as e:
        export_genai(tiny_model, bpe_tokenizer, other)
    assert "\n" not in str(e.value)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_genai(tiny_model, bpe_tokenizer, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "other", "out"]  # no staging


def test_a_failed_export_leaves_the_target_as_it_was(
    tmp_path: Path, tiny_model: Any, bpe_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("export.onnx_export.export_onnx", _fake_export_onnx())
    target = tmp_path / "out"
    export_genai(tiny_model, bpe_tokenizer, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr("export.onnx_export.export_onnx", _fake_export_onnx(fail=True))
    with pytest.raises(ParityError):
        export_genai(tiny_model, bpe_tokenizer, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture(scope="module")
def peaked_model() -> Any:
    """A seeded tiny GPT with large weights, so greedy choices are decided by wide margins (the
    usual 0.02 init makes near-ties that rounding can flip). The lone bytes 0x80-0xff and
    <|endoftext|> get near-zero embeddings (the head is tied), so greedy never picks them: the
    text stays valid UTF-8 (genai's decoder drops what follows an invalid byte, gptkit's writes
    U+FFFD) and both generate all NEW_TOKENS."""
    import torch

    from gpt_core.config import GPTConfig
    from gpt_core.model import GPT

    torch.manual_seed(SEED)
    model = GPT(GPTConfig.preset("tiny")).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3)
        wte = model.transformer.wte.weight
        wte[128:256] *= 0.01
        wte[-1] *= 0.01
    return model


@pytest.mark.slow
@needs_genai
@pytest.mark.parametrize("kv_cache", contract.KV_CACHE_MODES)
def test_genai_greedy_equals_gptkit_run(
    tmp_path: Path, peaked_model: Any, bpe_tokenizer: Any, kv_cache: str
) -> None:
    import numpy as np
    import onnxruntime_genai as og

    assert peaked_model.config.vocab_size - 1 == bpe_tokenizer.eot_token
    target = tmp_path / "genai"
    result = export_genai(
        peaked_model, bpe_tokenizer, target, options=ExportOptions(kv_cache=kv_cache)
    )
    assert result.parity is not None and result.parity.ok
    config = json.loads((target / CONFIG_FILE).read_text())
    assert config["search"]["past_present_share_buffer"] is (kv_cache == contract.KV_INPLACE)

    ours = runtime.load(target / MODEL_FILE).complete(
        PROMPT, max_new_tokens=NEW_TOKENS, temperature=0
    )
    model = og.Model(str(target))
    tokenizer = og.Tokenizer(model)
    prompt_ids = np.asarray(tokenizer.encode(PROMPT), dtype=np.int32)
    assert prompt_ids.tolist() == bpe_tokenizer.encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + NEW_TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids[None, :])
    while not generator.is_done():
        generator.generate_next_token()
    theirs = np.asarray(generator.get_sequence(0))[len(prompt_ids) :]
    assert theirs.tolist() == ours.token_ids
    assert len(set(ours.token_ids)) > NEW_TOKENS // 3  # not one token repeated
    assert tokenizer.decode(theirs) == ours.text
