"""Importing a Hugging Face GPT-2 folder: same logits as transformers, same token ids as HF.

The checkpoint is a tiny random ``GPT2LMHeadModel`` (2 layers, 64 wide) over a byte-level BPE
trained with HF ``tokenizers`` on a few KB of Shakespeare, so no network is needed.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers
from hypothesis import given
from reliability_helpers import one_line_message
from runtime_helpers import TOKENIZER_TEXT as TEXT

from gpt_core.hf import load_hf_gpt2
from runtime.errors import CheckpointError
from runtime.tokenizer import ENDOFTEXT


def build_checkpoint(directory: Path, text: str, *, eot_first: bool) -> None:
    """Train a byte-level BPE and save a random tiny GPT-2 beside it, as transformers would."""
    hf_tok = tokenizers.ByteLevelBPETokenizer()
    specials = [ENDOFTEXT] if eot_first else []
    hf_tok.train_from_iterator([text], vocab_size=400, special_tokens=specials, show_progress=False)
    if not eot_first:  # GPT-2's own layout: <|endoftext|> is the last id
        hf_tok.add_special_tokens([ENDOFTEXT])
    eot = hf_tok.token_to_id(ENDOFTEXT)
    directory.mkdir()
    hf_tok.save_model(str(directory))  # vocab.json + merges.txt
    if not eot_first:  # added tokens are not in vocab.json; transformers 4 listed them here
        (directory / "added_tokens.json").write_text(json.dumps({ENDOFTEXT: eot}))
    hf_tok.save(str(directory / "tokenizer.json"))

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=64,
        vocab_size=hf_tok.get_vocab_size(),
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # random everything, so a wrong bias, norm or transpose shows
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(directory, safe_serialization=True)


@pytest.fixture(scope="module", params=[True, False], ids=["eot-first", "eot-last"])
def hf_dir(request, tmp_path_factory, shakespeare: str) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    build_checkpoint(directory, shakespeare[:20_000], eot_first=request.param)
    return directory


@pytest.fixture(scope="module")
def imported(hf_dir: Path):
    return load_hf_gpt2(hf_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir: Path):
    return tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))


def copy_without(source: Path, target: Path, *names: str) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*names))
    return target


# ---- the model ------------------------------------------------------------------------------------


def test_logits_match_transformers(hf_dir: Path, imported) -> None:
    model, _ = imported
    reference = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    x = torch.randint(
        0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(x).logits
        ours = model(x).logits
    assert (ours - expected).abs().max().item() < 1e-4
    assert model.config.n_layer == 2 and model.config.n_embd == 64 and model.config.dropout == 0.0
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.training


def test_checkpoint_without_transformer_prefix(hf_dir: Path, imported, tmp_path: Path) -> None:
    """A ``GPT2Model`` (no LM head) saves its weights without the ``transformer.`` prefix."""
    from safetensors.torch import load_file, save_file

    target = copy_without(hf_dir, tmp_path / "bare", "model.safetensors")
    weights = load_file(hf_dir / "model.safetensors")
    save_file(
        {k.removeprefix("transformer."): v for k, v in weights.items()},
        target / "model.safetensors",
    )
    model, _ = load_hf_gpt2(target)
    x = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(model(x).logits, imported[0](x).logits)


# ---- the tokenizer --------------------------------------------------------------------------------


def test_tokenizer_ids_equal_hf(imported, hf_tokenizer, shakespeare: str) -> None:
    _, tok = imported
    assert tok.n_vocab == hf_tokenizer.get_vocab_size()
    assert tok.eot_token == hf_tokenizer.token_to_id(ENDOFTEXT)
    text = shakespeare[50_000:53_000] + " héllo 😀 世界\t\r\n  x" + ENDOFTEXT + "tail  "
    assert tok.encode(text, allow_special=True) == hf_tokenizer.encode(text).ids
    assert tok.decode(hf_tokenizer.encode(text).ids) == text


@given(text=TEXT)
def test_tokenizer_ids_equal_hf_on_any_text(imported, hf_tokenizer, text: str) -> None:
    _, tok = imported
    assert tok.encode(text, allow_special=True) == hf_tokenizer.encode(text).ids


def test_vocab_and_merges_give_the_same_tokenizer(hf_dir: Path, imported, tmp_path: Path) -> None:
    target = copy_without(hf_dir, tmp_path / "slow", "tokenizer.json")
    _, tok = load_hf_gpt2(target)
    _, expected = imported
    assert tok.mergeable_ranks == expected.mergeable_ranks
    assert tok.special_tokens == expected.special_tokens
    slow = tokenizers.ByteLevelBPETokenizer(str(target / "vocab.json"), str(target / "merges.txt"))
    text = "ROMEO:\nWhat light through yonder window breaks? 😀"
    assert tok.encode(text) == slow.encode(text).ids


def test_gptkit_trained_tokenizer_json_imports(tmp_path: Path, shakespeare: str) -> None:
    """gpt_core.bpe's HF tokenizer (Split regex + ByteLevel) is a valid import too."""
    from gpt_core.bpe import train_hf_bpe
    from gpt_core.hf import hf_tokenizer
    from runtime.tokenizer import GPT2_PATTERN

    hf = train_hf_bpe([shakespeare[:20_000]], 300, pattern=GPT2_PATTERN, min_frequency=2)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = hf_tokenizer(tmp_path)
    text = shakespeare[30_000:31_000] + " 😀 世界"
    assert tok.encode(text) == hf.encode(text).ids
    assert tok.eot_token == -1  # trained without special tokens


def test_fp16_weights_load_as_float32(hf_dir: Path, imported, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    target = copy_without(hf_dir, tmp_path / "half", "model.safetensors")
    weights = load_file(hf_dir / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, target / "model.safetensors")
    model, _ = load_hf_gpt2(target)
    assert model.transformer.wte.weight.dtype == torch.float32
    x = torch.arange(10)[None]
    with torch.no_grad():
        assert (model(x).logits - imported[0](x).logits).abs().max().item() < 0.05


# ---- refusals -------------------------------------------------------------------------------------


class _Touch:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_refused_unread(hf_dir: Path, tmp_path: Path) -> None:
    target = copy_without(hf_dir, tmp_path / "pickled", "model.safetensors")
    marker = tmp_path / "unpickled"
    (target / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle.*safetensors") as error:
        load_hf_gpt2(target)
    one_line_message(error)
    assert "safe_serialization=True" in str(error.value)
    assert not marker.exists()


def edit_config(hf_dir: Path, target: Path, **changes) -> Path:
    copy_without(hf_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"model_type": "llama"}, "model_type"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_inner": 100}, "n_inner"),
        ({"n_layer": 3}, "missing h.2|missing transformer.h.2"),
        ({"n_head": 3}, "divisible"),
        ({"vocab_size": 10}, "shape"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unsupported_configs_are_refused(hf_dir: Path, tmp_path: Path, changes, message) -> None:
    target = edit_config(hf_dir, tmp_path / "edited", **changes)
    with pytest.raises(CheckpointError, match=message) as error:
        load_hf_gpt2(target)
    one_line_message(error)


def test_missing_and_corrupt_files_are_refused(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf_gpt2(tmp_path / "nowhere")
    no_config = copy_without(hf_dir, tmp_path / "no-config", "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        load_hf_gpt2(no_config)
    no_weights = copy_without(hf_dir, tmp_path / "no-weights", "model.safetensors")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        load_hf_gpt2(no_weights)
    corrupt = copy_without(hf_dir, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="unreadable safetensors") as error:
        load_hf_gpt2(corrupt)
    one_line_message(error)
    no_tokenizer = copy_without(
        hf_dir, tmp_path / "no-tokenizer", "tokenizer.json", "vocab.json", "merges.txt"
    )
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_hf_gpt2(no_tokenizer)


def test_untied_head_is_refused(hf_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    target = copy_without(hf_dir, tmp_path / "untied", "model.safetensors")
    weights = load_file(hf_dir / "model.safetensors")
    weights["lm_head.weight"] = torch.randn_like(weights["transformer.wte.weight"])
    save_file(weights, target / "model.safetensors")
    with pytest.raises(CheckpointError, match="untied"):
        load_hf_gpt2(target)


def test_ids_out_of_merge_order_are_refused(hf_dir: Path, tmp_path: Path) -> None:
    """tiktoken ranks are merge priorities; a vocab numbered otherwise cannot keep its ids."""
    target = copy_without(hf_dir, tmp_path / "shuffled", "tokenizer.json")
    vocab = json.loads((target / "vocab.json").read_text())
    merges = [line.split() for line in (target / "merges.txt").read_text().splitlines()[1:]]
    first, second = "".join(merges[0]), "".join(merges[1])
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (target / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match="merge order"):
        load_hf_gpt2(target)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc["pre_tokenizer"].update(add_prefix_space=True), "pre_tokenizer"),
        (lambda doc: doc.update(normalizer={"type": "NFC"}), "normalizers"),
        (lambda doc: doc["model"].update(type="WordPiece"), "BPE"),
    ],
    ids=["add-prefix-space", "normalizer", "not-bpe"],
)
def test_unsupported_tokenizers_are_refused(hf_dir: Path, tmp_path: Path, edit, message) -> None:
    target = copy_without(hf_dir, tmp_path / "tok")
    doc = json.loads((target / "tokenizer.json").read_text())
    edit(doc)
    (target / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=message) as error:
        load_hf_gpt2(target)
    one_line_message(error)


def test_a_gptkit_checkpoint_is_pointed_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    with pytest.raises(CheckpointError, match="gptkit checkpoint.*load_model"):
        load_hf_gpt2(tmp_path)
