"""CustomDataset: memmap token cache, splits, windows, exact character counts, one-line errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reliability_helpers import one_line_message

from gpt_core import dataset as ds
from gpt_core.dataset import (
    CustomDataset,
    bundled_corpus_path,
    token_char_counts,
    tokenize_cached,
)
from runtime.errors import DataError

SOURCE = Path("/work/shared/data/tinyshakespeare.txt")
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own token cache, never the user's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(cache))
    return cache


def test_ids_are_the_tokenized_text_and_windows_shift_by_one(corpus, bpe_tokenizer) -> None:
    train = CustomDataset(corpus, bpe_tokenizer, block_size=32)
    val = CustomDataset(corpus, bpe_tokenizer, block_size=32, split="val")
    expected = bpe_tokenizer.encode(corpus.read_text(encoding="utf-8"))
    assert np.concatenate([train.ids, val.ids]).tolist() == expected
    assert train.ids.dtype == np.uint16
    assert len(val.ids) == int(len(expected) * 0.1)
    x, y = train[3]
    assert x.shape == y.shape == (32,) and x.dtype == torch.int64
    assert x[1:].tolist() == y[:-1].tolist()
    assert x.tolist() == expected[96:128]
    assert len(train) == (len(train.ids) - 1) // 32
    with pytest.raises(IndexError):
        train[len(train)]


def test_files_and_directories_are_joined_by_endoftext(tmp_path, bpe_tokenizer) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("second file " * 30)
    (docs / "sub" / "a.md").write_text("first file " * 30)
    (docs / "empty.txt").write_text("")  # skipped inside a directory
    (docs / "image.png").write_bytes(b"\x89PNG")  # not text: ignored
    ids = tokenize_cached(ds.resolve_text_files(docs), bpe_tokenizer)
    eot = bpe_tokenizer.eot_token
    assert ids.tolist() == (
        bpe_tokenizer.encode("second file " * 30) + [eot] + bpe_tokenizer.encode("first file " * 30)
    )
    listed = ds.resolve_text_files([docs / "b.txt", docs / "sub" / "a.md"])
    assert tokenize_cached(listed, bpe_tokenizer).tolist() == ids.tolist()


def test_second_run_reads_the_cache(corpus, bpe_tokenizer, monkeypatch, cache_dir) -> None:
    first = CustomDataset(corpus, bpe_tokenizer, block_size=32).ids.tolist()
    monkeypatch.setattr(
        bpe_tokenizer, "encode", lambda *a, **k: pytest.fail("re-tokenized a cached corpus")
    )
    assert CustomDataset(corpus, bpe_tokenizer, block_size=32).ids.tolist() == first
    assert len(list(cache_dir.glob("tokens/*.bin"))) == 1


def test_an_edited_file_or_another_tokenizer_misses_the_cache(corpus, bpe_tokenizer) -> None:
    from gpt_core.bpe import train_bpe

    before = tokenize_cached([corpus], bpe_tokenizer).tolist()
    corpus.write_text(corpus.read_text() + "A new line.\n")
    after = tokenize_cached([corpus], bpe_tokenizer).tolist()
    assert after[: len(before) - 2] == before[:-2] and len(after) > len(before)
    other = train_bpe([corpus.read_text()], 300, name="other")
    assert tokenize_cached([corpus], other).tolist() == other.encode(corpus.read_text())


def test_a_damaged_cache_entry_is_rebuilt(corpus, bpe_tokenizer, cache_dir) -> None:
    expected = tokenize_cached([corpus], bpe_tokenizer).tolist()
    (meta,) = cache_dir.glob("tokens/*.json")
    meta.write_text("{not json")
    assert tokenize_cached([corpus], bpe_tokenizer).tolist() == expected
    (binary,) = cache_dir.glob("tokens/*.bin")
    binary.write_bytes(binary.read_bytes()[:10])  # truncated
    assert tokenize_cached([corpus], bpe_tokenizer).tolist() == expected


def test_large_vocabularies_are_stored_as_uint32(corpus, bpe_tokenizer) -> None:
    class Wide:  # only what tokenize_cached uses
        n_vocab, eot_token = 70_000, 69_999

        def encode(self, text: str) -> list[int]:
            return [69_998] * 3

        def fingerprint(self) -> str:
            return "wide"

    assert bpe_tokenizer.n_vocab <= 1 << 16
    ids = tokenize_cached([corpus], Wide())
    assert ids.dtype == np.uint32 and ids.tolist()[:3] == [69_998] * 3


@given(text=st.text(CHARS, min_size=1, max_size=200))
def test_chunked_reading_never_splits_a_character(tmp_path_factory, bpe_tokenizer, text) -> None:
    path = tmp_path_factory.mktemp("chunks") / "t.txt"
    path.write_text(text + "é😀" * 10, encoding="utf-8")
    original = ds.CHUNK_BYTES
    ds.CHUNK_BYTES = 7  # chunks end mid-character unless cut at a boundary
    try:
        ids = tokenize_cached([path], bpe_tokenizer, path.parent / "cache")
    finally:
        ds.CHUNK_BYTES = original
    assert bpe_tokenizer.decode_bytes(ids.tolist()) == path.read_bytes()


@given(text=st.text(CHARS, max_size=100))
def test_token_char_counts_give_exact_characters(bpe_tokenizer, text) -> None:
    counts = token_char_counts(bpe_tokenizer)
    assert int(counts[bpe_tokenizer.encode(text)].sum()) == len(text)


def test_epoch_order_is_a_function_of_seed_and_epoch(corpus, bpe_tokenizer) -> None:
    train = CustomDataset(corpus, bpe_tokenizer, block_size=32)
    a, b = train.epoch_starts(0, seed=1), train.epoch_starts(0, seed=1)
    assert a.tolist() == b.tolist()
    assert a.tolist() != train.epoch_starts(1, seed=1).tolist()
    assert a.tolist() != train.epoch_starts(0, seed=2).tolist()
    assert a.min() >= 0 and a.max() + 33 <= len(train.ids)
    assert len(set(a.tolist())) == len(a)  # a tiling: each window once per epoch
    assert train.eval_starts(4) == train.eval_starts(4) and len(train.eval_starts(4)) == 4
    assert len(train.eval_starts()) == len(train)


def test_missing_empty_and_textless_paths(tmp_path, bpe_tokenizer) -> None:
    with pytest.raises(DataError) as e:
        CustomDataset(tmp_path / "nope.txt", bpe_tokenizer, 32)
    assert "nope.txt does not exist" in one_line_message(e)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError) as e:
        CustomDataset(tmp_path / "empty.txt", bpe_tokenizer, 32)
    assert "empty.txt is empty" in one_line_message(e)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.bin").write_bytes(b"123")
    with pytest.raises(DataError) as e:
        CustomDataset(tmp_path / "dir", bpe_tokenizer, 32)
    assert "has no non-empty text files" in one_line_message(e)
    with pytest.raises(DataError) as e:
        CustomDataset([], bpe_tokenizer, 32)
    assert "no data files" in one_line_message(e)


def test_text_that_is_not_utf8_names_file_and_offset(tmp_path, bpe_tokenizer) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(("hello\n" * 10).encode() + "caf\u00e9".encode("latin-1") + b" more\n")
    original = ds.CHUNK_BYTES
    ds.CHUNK_BYTES = 16  # the bad byte sits in a later chunk: the offset is still absolute
    try:
        with pytest.raises(DataError) as e:
            CustomDataset(path, bpe_tokenizer, 4)
    finally:
        ds.CHUNK_BYTES = original
    assert f"{path} is not UTF-8 text (invalid byte at offset 63)" in one_line_message(e)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"abc\x00def")
    with pytest.raises(DataError) as e:
        CustomDataset(binary, bpe_tokenizer, 4)
    assert "NUL byte at offset 3" in one_line_message(e)


def test_a_corpus_too_short_for_the_block(tmp_path, bpe_tokenizer) -> None:
    path = tmp_path / "short.txt"
    path.write_text("To be, or not to be.")
    with pytest.raises(DataError) as e:
        CustomDataset(path, bpe_tokenizer, 64)
    assert "too few for block_size 64" in one_line_message(
        e
    ) and "--block-size" in one_line_message(e)
    with pytest.raises(DataError):
        CustomDataset(path, bpe_tokenizer, 4, split="test")


def test_bundled_corpus_is_tiny_shakespeare(cache_dir) -> None:
    path = bundled_corpus_path()
    assert path.is_relative_to(cache_dir)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert len(text) > 1_000_000
    if SOURCE.exists():
        assert text == SOURCE.read_text(encoding="utf-8")
    packaged = Path(ds.__file__).parent / "data" / ds.BUNDLED_CORPUS
    assert gzip.decompress(packaged.read_bytes()).decode() == text
