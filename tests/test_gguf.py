"""GGUF hand-off: a gptkit model, exported with ``export_hf``, converted by llama.cpp's own
``convert_hf_to_gguf.py``, and read back with llama.cpp's ``gguf`` reader.

Runs where ``GPTKIT_LLAMA_CONVERTER`` names that script, as ``scripts/fetch_llama_converter.sh
DEST`` lays it out (from PyPI's llama-cpp-python source distribution, with the gptkit patch that
lets a new GPT-2-style vocabulary through as llama.cpp's "gpt-2" pre-tokenizer); skipped otherwise.
Checks: every tensor equals gptkit's weight bit for bit (f32) under llama.cpp's name, the head is
the tied embedding, the hyperparameters, and the vocabulary: tokens, types, special ids, merges,
and that llama.cpp's BPE algorithm on that vocabulary encodes text to gptkit's ids.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import regex

from export.hf_export import export_hf
from gpt_core.bpe import bytes_to_unicode
from gpt_core.model import GPT
from runtime.tokenizer import ENDOFTEXT, Tokenizer

CONVERTER_ENV = "GPTKIT_LLAMA_CONVERTER"
PATCH_MARK = "_gptkit_splits_like_gpt2"  # scripts/fetch_llama_converter.sh's patch
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2 split (src/llama-vocab.cpp), with the trailing `\s+`
# its hand-written matcher applies.
LLAMA_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n  It is the east, and "
    "Juliet is the sun. 'Tis 1597; I'll, we've café, 世界 😀\t\t  3.14159   \n"
)


def _converter() -> Path:
    value = os.environ.get(CONVERTER_ENV)
    if not value:
        pytest.skip(
            f"{CONVERTER_ENV} is not set: run `bash scripts/fetch_llama_converter.sh DEST` and "
            f"set {CONVERTER_ENV}=DEST/convert_hf_to_gguf.py"
        )
    path = Path(value)
    if path.name != "convert_hf_to_gguf.py" or not path.is_file():
        pytest.skip(f"{CONVERTER_ENV}={value} is not llama.cpp's convert_hf_to_gguf.py")
    base = path.parent / "conversion" / "base.py"
    if not base.is_file() or PATCH_MARK not in base.read_text(encoding="utf-8"):
        pytest.skip(
            f"{path} lacks gptkit's pre-tokenizer patch (a new vocabulary is 'not recognized' "
            "otherwise): fetch it with scripts/fetch_llama_converter.sh"
        )
    return path


def _gguf(converter: Path) -> ModuleType:
    """The ``gguf`` package the converter writes with: its vendored gguf-py, else PyPI's."""
    vendored = converter.parent / "gguf-py"
    if (vendored / "gguf" / "__init__.py").is_file() and "gguf" not in sys.modules:
        sys.path.insert(0, str(vendored))
        try:
            import gguf
        finally:
            sys.path.remove(str(vendored))
        return gguf
    return pytest.importorskip("gguf", reason="the gguf package is needed to read the file")


@pytest.fixture(scope="module")
def converted(
    tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: Tokenizer
) -> tuple[GPT, Tokenizer, Any, Path]:
    """(gptkit model, tokenizer, GGUFReader of its f32 GGUF, the HF export directory)."""
    import torch

    from gpt_core.config import GPTConfig

    converter = _converter()
    gguf = _gguf(converter)
    pytest.importorskip("transformers", reason="llama.cpp's converter reads the export with it")
    torch.manual_seed(1234)
    model = GPT(GPTConfig.preset("tiny")).eval()
    work = tmp_path_factory.mktemp("gguf")
    hf_dir = work / "tiny-hf"
    export_hf(model, bpe_tokenizer, hf_dir)
    out = work / "tiny-f32.gguf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(converter), str(hf_dir), "--outtype", "f32"]
    command += ["--outfile", str(out), "--model-name", "gptkit-tiny"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"convert_hf_to_gguf.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return model, bpe_tokenizer, gguf.GGUFReader(out), hf_dir


def _value(reader: Any, key: str) -> Any:
    assert key in reader.fields, f"GGUF lacks {key}"
    return reader.fields[key].contents()


def llama_name(name: str) -> str | None:
    """gptkit's parameter name as llama.cpp's GPT-2 tensor name (None: the tied head)."""
    names = {
        "transformer.wte.weight": "token_embd.weight",
        "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight",
        "transformer.ln_f.bias": "output_norm.bias",
        "lm_head.weight": None,
    }
    if name in names:
        return names[name]
    blocks = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{blocks[module]}.{kind}"


def test_every_tensor_is_the_weight_bit_for_bit(converted: tuple[GPT, Tokenizer, Any, Path]):
    model, _, reader, _ = converted
    import gguf

    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    expected = {llama_name(k): v.numpy() for k, v in state.items() if llama_name(k)}
    tensors = {t.name: t for t in reader.tensors}
    # No output.weight: llama.cpp's GPT-2 then uses token_embd as the head, as gptkit ties it.
    assert sorted(tensors) == sorted(expected)
    for name, weight in expected.items():
        tensor = tensors[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        # GGUF lists ggml's dims innermost first; the data reads back in PyTorch's (out, in)
        # order: the converter undoes Hugging Face's Conv1D transpose, as gptkit stores nn.Linear.
        assert tuple(int(d) for d in tensor.shape) == weight.shape[::-1], name
        assert tensor.data.dtype == np.float32 and tensor.data.shape == weight.shape, name
        np.testing.assert_array_equal(tensor.data, weight, err_msg=name)


def test_hyperparameters(converted: tuple[GPT, Tokenizer, Any, Path]):
    model, _, reader, _ = converted
    cfg = model.config
    assert _value(reader, "general.architecture") == "gpt2"
    assert _value(reader, "general.name") == "gptkit-tiny"
    assert _value(reader, "gpt2.block_count") == cfg.n_layer
    assert _value(reader, "gpt2.context_length") == cfg.block_size
    assert _value(reader, "gpt2.embedding_length") == cfg.n_embd
    assert _value(reader, "gpt2.feed_forward_length") == 4 * cfg.n_embd
    assert _value(reader, "gpt2.attention.head_count") == cfg.n_head
    assert _value(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)


def test_vocabulary(converted: tuple[GPT, Tokenizer, Any, Path]):
    model, tokenizer, reader, _ = converted
    import gguf

    assert _value(reader, "tokenizer.ggml.model") == "gpt2"
    assert _value(reader, "tokenizer.ggml.pre") == "gpt-2"  # what the gptkit patch decides
    tokens = _value(reader, "tokenizer.ggml.tokens")
    types = _value(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == model.config.vocab_size
    eot = tokenizer.eot_token
    for key in ("eos", "bos"):
        assert _value(reader, f"tokenizer.ggml.{key}_token_id") == eot
    to_text = bytes_to_unicode()
    for token_id in range(model.config.vocab_size):
        if token_id == eot:
            assert (tokens[token_id], types[token_id]) == (ENDOFTEXT, gguf.TokenType.CONTROL)
        elif token_id < tokenizer.n_vocab:
            text = "".join(to_text[b] for b in tokenizer.token_bytes(token_id))
            assert (tokens[token_id], types[token_id]) == (text, gguf.TokenType.NORMAL), token_id
        else:  # ids the model has beyond the tokenizer's
            assert types[token_id] == gguf.TokenType.UNUSED, token_id
    # Merge i builds the token of rank 256 + i: llama.cpp forms tokens in gptkit's rank order.
    merges = _value(reader, "tokenizer.ggml.merges")
    ids = {text: i for i, text in enumerate(tokens)}
    assert [ids["".join(m.split(" "))] for m in merges] == list(range(256, 256 + len(merges)))
    assert len(merges) == tokenizer.n_vocab - 257  # every id but the bytes and <|endoftext|>


def llama_bpe_encode(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """llama.cpp's GPT-2 tokenization (llm_tokenizer_bpe): split with the "gpt-2" pre-tokenizer,
    map bytes to GPT-2's unicode alphabet, then merge the adjacent pair of lowest merge rank."""
    ids = {token: i for i, token in enumerate(tokens)}
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    to_text = bytes_to_unicode()
    out = []
    for word in regex.findall(LLAMA_GPT2_SPLIT, text):
        parts = [to_text[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            pairs = [
                (rank.get(pair, len(rank)), i)
                for i, pair in enumerate(zip(parts, parts[1:], strict=False))
            ]
            best, i = min(pairs)
            if best == len(rank):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ids[part] for part in parts)
    return out


def test_llama_bpe_on_the_gguf_vocabulary_gives_gptkit_ids(
    converted: tuple[GPT, Tokenizer, Any, Path], shakespeare: str
):
    _, tokenizer, reader, _ = converted
    tokens = _value(reader, "tokenizer.ggml.tokens")
    merges = _value(reader, "tokenizer.ggml.merges")
    for text in (TEXT, shakespeare[16_000:24_000]):  # the second: text the BPE did not train on
        assert llama_bpe_encode(text, tokens, merges) == tokenizer.encode(text)
