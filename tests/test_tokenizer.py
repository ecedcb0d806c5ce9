"""The tokenizer: lossless round trips, streaming, serialisation, offline behaviour, BPE training."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import runtime.tokenizer as tokenizer_module
from runtime.errors import TokenizerError
from runtime.tokenizer import ENDOFTEXT, GPT2_PATTERN, Tokenizer

# Lone surrogates (category Cs) are excluded: they have no UTF-8 encoding, so no str containing
# one can round-trip through bytes. tiktoken replaces them with U+FFFD (see test_lone_surrogate).
CHARS = st.characters(blacklist_categories=("Cs",))
TRICKY = [
    "😀",
    "👩‍👩‍👧",
    "世界",
    "こんにちは",
    "é",
    "e\u0301",
    "\x00",
    "\x7f",
    "\r\n",
    "\t",
    " ",
    ENDOFTEXT,
]
TEXT = st.lists(st.one_of(st.text(CHARS), st.sampled_from(TRICKY)), max_size=12).map("".join)
# Mostly multi-byte characters, so they are split across byte-level tokens.
MULTIBYTE = st.lists(
    st.one_of(
        st.sampled_from(TRICKY),
        st.text(st.characters(min_codepoint=0x80, blacklist_categories=("Cs",)), max_size=4),
    ),
    max_size=12,
).map("".join)


def byte_tokenizer() -> Tokenizer:
    return Tokenizer.from_ranks({bytes([b]): b for b in range(256)}, name="bytes")


# ---- round trips ----------------------------------------------------------------------------------


@given(text=TEXT)
def test_decode_encode_round_trip(bpe_tokenizer: Tokenizer, text: str) -> None:
    ids = bpe_tokenizer.encode(text)
    assert bpe_tokenizer.decode(ids) == text
    assert bpe_tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < bpe_tokenizer.n_vocab for i in ids)


@given(text=TEXT)
def test_special_text_is_ordinary_by_default(bpe_tokenizer: Tokenizer, text: str) -> None:
    ids = bpe_tokenizer.encode(text)
    assert bpe_tokenizer.eot_token not in ids  # user text can never inject a control token
    allowed = bpe_tokenizer.encode(text, allow_special=True)
    assert allowed.count(bpe_tokenizer.eot_token) == text.count(ENDOFTEXT)
    assert bpe_tokenizer.decode(allowed) == text


def test_allow_special_gives_the_eot_id(bpe_tokenizer: Tokenizer) -> None:
    eot = bpe_tokenizer.eot_token
    assert eot == bpe_tokenizer.n_vocab - 1
    assert bpe_tokenizer.encode(ENDOFTEXT, allow_special=True) == [eot]
    assert bpe_tokenizer.encode(ENDOFTEXT) != [eot]
    ids = bpe_tokenizer.encode(f"To be{ENDOFTEXT}or not", allow_special=True)
    assert ids.count(eot) == 1
    assert bpe_tokenizer.decode(ids) == f"To be{ENDOFTEXT}or not"


def test_lone_surrogate_becomes_replacement_character(bpe_tokenizer: Tokenizer) -> None:
    """A lone surrogate is not UTF-8; encoding replaces it rather than failing."""
    assert bpe_tokenizer.decode(bpe_tokenizer.encode("a\ud800b")) == "a\ufffdb"


def test_decode_rejects_ids_outside_the_vocabulary(bpe_tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="outside"):
        bpe_tokenizer.decode([bpe_tokenizer.n_vocab])
    with pytest.raises(TokenizerError, match="outside"):
        bpe_tokenizer.decode([-1])


# ---- streaming ------------------------------------------------------------------------------------


@given(text=MULTIBYTE)
def test_stream_decoder_never_emits_partial_characters(bpe_tokenizer: Tokenizer, text: str) -> None:
    decoder = bpe_tokenizer.stream_decoder()
    pieces = [decoder.add(i) for i in bpe_tokenizer.encode(text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert "\ufffd" not in piece  # a split character would show up as U+FFFD
        assert text.startswith(emitted)


def test_stream_decoder_holds_back_a_split_emoji() -> None:
    tok = byte_tokenizer()
    decoder = tok.stream_decoder()
    emoji = "😀".encode()
    assert [decoder.add(b) for b in emoji] == ["", "", "", "😀"]
    assert decoder.flush() == ""


def test_stream_decoder_flush_replaces_an_incomplete_tail() -> None:
    tok = byte_tokenizer()
    decoder = tok.stream_decoder()
    assert decoder.add("😀".encode()[0]) == ""
    assert decoder.flush() == "\ufffd"


# ---- serialisation --------------------------------------------------------------------------------

SAMPLE = "ROMEO:\nBut soft, what light through yonder window breaks? 😀 世界 " + ENDOFTEXT


def test_bytes_round_trip(bpe_tokenizer: Tokenizer) -> None:
    loaded = Tokenizer.from_bytes(bpe_tokenizer.to_bytes())
    assert loaded == bpe_tokenizer
    assert loaded.fingerprint() == bpe_tokenizer.fingerprint()
    assert loaded.encode(SAMPLE) == bpe_tokenizer.encode(SAMPLE)
    assert loaded.encode(SAMPLE, allow_special=True) == bpe_tokenizer.encode(
        SAMPLE, allow_special=True
    )
    assert loaded.from_bytes(loaded.to_bytes().decode("ascii")) == loaded  # str works too


def test_save_load_round_trip(bpe_tokenizer: Tokenizer, tmp_path) -> None:
    bpe_tokenizer.save(tmp_path)
    for path in (tmp_path, tmp_path / "tokenizer.json", tmp_path / "tokenizer.tiktoken"):
        loaded = Tokenizer.load(path)
        assert loaded == bpe_tokenizer, path
        assert loaded.encode(SAMPLE, allow_special=True) == bpe_tokenizer.encode(
            SAMPLE, allow_special=True
        )


def test_bare_tiktoken_file_gets_gpt2_defaults(bpe_tokenizer: Tokenizer, tmp_path) -> None:
    bpe_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    loaded = Tokenizer.load(tmp_path / "tokenizer.tiktoken")
    assert loaded.pattern == GPT2_PATTERN
    assert loaded.eot_token == bpe_tokenizer.eot_token
    assert loaded.encode(SAMPLE) == bpe_tokenizer.encode(SAMPLE)


def _doc(tok: Tokenizer) -> dict:
    return json.loads(tok.to_bytes())


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda doc: b"not json",
        lambda doc: b"[1, 2]",
        lambda doc: json.dumps({k: v for k, v in doc.items() if k != "ranks"}).encode(),
        lambda doc: json.dumps({**doc, "ranks": "!!!! 0\n"}).encode(),
        lambda doc: json.dumps({**doc, "ranks": ""}).encode(),
        lambda doc: json.dumps({**doc, "ranks": doc["ranks"].split("\n", 1)[1]}).encode(),
        lambda doc: json.dumps({**doc, "version": 99}).encode(),
        lambda doc: json.dumps({**doc, "special_tokens": {ENDOFTEXT: "x"}}).encode(),
        lambda doc: json.dumps({**doc, "special_tokens": {ENDOFTEXT: 0}}).encode(),
        lambda doc: json.dumps({**doc, "special_tokens": {ENDOFTEXT: 10**6}}).encode(),
        lambda doc: json.dumps({**doc, "pattern": "(unclosed"}).encode(),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-ranks",
        "bad-base64",
        "empty-ranks",
        "missing-byte",
        "future-version",
        "special-not-int",
        "special-reuses-id",
        "id-gap",
        "bad-regex",
    ],
)
def test_corrupt_data_raises_tokenizer_error(bpe_tokenizer: Tokenizer, corrupt) -> None:
    with pytest.raises(TokenizerError):
        Tokenizer.from_bytes(corrupt(_doc(bpe_tokenizer)))


def test_corrupt_files_raise_tokenizer_error(bpe_tokenizer: Tokenizer, tmp_path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path)
    bpe_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.tiktoken").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(TokenizerError, match="tokenizer.tiktoken"):
        Tokenizer.load(tmp_path)


def test_special_tokens_may_come_first() -> None:
    """Hugging Face tokenizers often put <|endoftext|> at id 0; ids must still be 0..n-1."""
    ranks = {bytes([b]): b + 1 for b in range(256)}
    tok = Tokenizer.from_ranks(ranks, name="eot-first", special_tokens={ENDOFTEXT: 0})
    assert tok.eot_token == 0
    assert tok.n_vocab == 257
    assert tok.encode("hi") == [ord("h") + 1, ord("i") + 1]
    assert Tokenizer.from_bytes(tok.to_bytes()) == tok


# ---- tiktoken's GPT-2 encoding, offline -----------------------------------------------------------


def test_gpt2_offline_fails_fast_with_a_fix(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    calls = []

    def unreachable(host: str, timeout: float) -> bool:
        calls.append(host)
        return False

    monkeypatch.setattr(tokenizer_module, "_reachable", unreachable)
    with pytest.raises(TokenizerError, match="TIKTOKEN_CACHE_DIR"):
        Tokenizer.gpt2()
    assert calls == ["openaipublic.blob.core.windows.net"]


# ---- BPE training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_4096(shakespeare: str):
    """The whole 1 MB corpus to 4096 ids, in gptkit and in Hugging Face's trainer (about 1 s)."""
    from gpt_core.bpe import train_bpe, train_hf_bpe

    ours = train_bpe([shakespeare], 4096, name="shakespeare-4096")
    hf = train_hf_bpe([shakespeare], 4095, pattern=GPT2_PATTERN, min_frequency=2)
    return ours, hf


@pytest.mark.slow  # with the next: two 4096-id BPEs trained on the 1 MB corpus
@pytest.mark.torch
def test_bpe_training_reaches_the_asked_vocab_size(trained_4096, shakespeare: str) -> None:
    ours, _ = trained_4096
    assert ours.n_vocab == 4096
    assert ours.eot_token == 4095
    ids = ours.encode(shakespeare)
    assert len(ids) < len(shakespeare) / 3  # it learned something: > 3 characters per token
    assert ours.decode(ids) == shakespeare


@pytest.mark.slow
@pytest.mark.torch
def test_tiktoken_encodes_like_the_hf_trainer(trained_4096, shakespeare: str) -> None:
    from gpt_core.bpe import bytes_to_unicode

    ours, hf = trained_4096
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    hf_tokens = [bytes(byte_of[ch] for ch in token) for token in hf.encode(shakespeare).tokens]
    our_tokens = [ours.token_bytes(i) for i in ours.encode(shakespeare)]
    assert our_tokens == hf_tokens


def test_train_bpe_rejects_a_too_small_vocab() -> None:
    from gpt_core.bpe import train_bpe

    with pytest.raises(TokenizerError, match="at least 257"):
        train_bpe(["hello"], 100)
