"""Reliability matrix, training data: bad corpora through `gptkit train --data` and the dataset API.

Every bad corpus fails before any model exists: one ``Error: ...`` line naming the file (and, for
undecodable bytes, the exact byte offset), exit 1, and no run directory created. The token cache
must notice a file that changed between two runs, even when its size and mtime did not change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from reliability_helpers import one_line_error

from gpt_core.dataset import (
    CHUNK_BYTES,
    CustomDataset,
    default_cache_dir,
    read_text,
    resolve_text_files,
    tokenize_cached,
)
from gptkit.cli import cli
from runtime.errors import DataError

TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--vocab-size", "300"]


pytestmark = pytest.mark.usefixtures("isolated_dirs")


@pytest.fixture
def train_on(runner: CliRunner) -> Callable[..., Result]:
    """``gptkit train`` for two tiny steps on the given files, through the shared CliRunner."""

    def invoke(*data: Path | str) -> Result:
        args = ["train", *TINY, "--max-steps", "2", "--out", "run"]
        for d in data:
            args += ["--data", str(d)]
        return runner.invoke(cli, args)

    return invoke


def lines_of(text: str, size: int) -> bytes:
    """``size`` bytes of ASCII lines cut from ``text``."""
    data = (text.encode() * (size // len(text) + 1))[:size]
    return data[:-1] + b"\n"


# ---- bad corpora through the command line -----------------------------------------------------

CLI_CASES = [
    # (id, make(tmp_path) -> path, needles)
    ("missing-path", lambda d: d / "nope.txt", ["nope.txt does not exist"]),
    ("empty-file", lambda d: _write(d / "empty.txt", b""), ["empty.txt is empty"]),
    (
        "binary-with-nul",
        lambda d: _write(d / "prog.txt", b"\x7fELF\x02\x01\x01\x00" + bytes(range(1, 128)) * 8),
        ["prog.txt looks like a binary file", "NUL byte at offset 7"],
    ),
    (
        "binary-not-utf8",
        lambda d: _write(d / "img.txt", b"\x89PNG\r\n\x1a\n" + os.urandom(2048)),
        ["img.txt is not UTF-8 text", "invalid byte at offset 0"],
    ),
    (
        "latin1-text",
        lambda d: _write(d / "fr.txt", "Ça va très bien.\n".encode("latin-1") * 50),
        ["fr.txt is not UTF-8 text", "invalid byte at offset 0"],
    ),
    (
        "directory-without-text",
        lambda d: _tree(d / "imgs", {"a.png": b"\x89PNG", "b.bin": b"\x00\x01", "c.json": b"{}"}),
        ["directory", "imgs has no non-empty text files"],
    ),
    (
        "directory-of-empty-txt",
        lambda d: _tree(d / "blank", {"a.txt": b"", "sub/b.txt": b""}),
        ["blank has no non-empty text files"],
    ),
    (
        "directory-with-one-binary-txt",
        lambda d: _tree(d / "mixed", {"a.txt": b"To be, or not to be.\n" * 50, "b.txt": b"ok\x00"}),
        ["b.txt looks like a binary file", "offset 2"],
    ),
    (
        "corpus-shorter-than-a-block",
        lambda d: _write(d / "short.txt", b"To be, or not to be: that is the question.\n"),
        ["too few for block_size 32", "smaller --block-size"],
    ),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize(
    ("make", "needles"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_bad_corpus_fails_before_training(train_on, tmp_path, make, needles):
    """`gptkit train --data PATH --preset tiny ... --out run`: one line, exit 1, no run/."""
    path = make(tmp_path)
    one_line_error(train_on(path), *needles)
    assert not (tmp_path / "run").exists()


# ---- invalid UTF-8 in the middle of a large file: file and exact byte offset -------------------

OFFSET_CASES = [
    ("middle-of-3mb", 3_000_000, 2_500_001, True),
    ("last-byte-of-first-chunk", 2 * CHUNK_BYTES, CHUNK_BYTES - 1, True),
    ("first-byte-of-second-chunk", 2 * CHUNK_BYTES, CHUNK_BYTES, True),
    ("one-long-line", 3 * CHUNK_BYTES, 2 * CHUNK_BYTES + 12_345, False),
]


@pytest.mark.parametrize(
    ("size", "bad_at", "newlines"),
    [c[1:] for c in OFFSET_CASES],
    ids=[c[0] for c in OFFSET_CASES],
)
def test_invalid_utf8_names_file_and_byte_offset(train_on, tmp_path, shakespeare, bpe_tokenizer, size, bad_at, newlines):  # fmt: skip
    data = bytearray(lines_of(shakespeare[:5000], size) if newlines else b"a" * size)
    data[bad_at] = 0xFF
    path = _write(tmp_path / "big.txt", bytes(data))
    for read in (lambda: read_text([path]), lambda: tokenize_cached([path], bpe_tokenizer)):
        with pytest.raises(DataError) as info:
            read()
        assert f"{path} is not UTF-8 text (invalid byte at offset {bad_at})" in str(info.value)
    if bad_at == 2_500_001:  # and through the command line, once
        one_line_error(train_on(path), str(path), f"offset {bad_at}")
    assert not list((tmp_path / "cache" / "tokens").glob("*.bin"))  # no half-built cache entry


def test_multibyte_character_across_the_chunk_boundary_is_fine(tmp_path, bpe_tokenizer):
    """The control case: a valid 4-byte character straddling the 1 MiB read is not an error."""
    text = "a" * (CHUNK_BYTES - 2) + "\U0001f600" + "b" * 100  # no newline to cut at
    path = _write(tmp_path / "emoji.txt", text.encode())
    assert read_text([path]) == text + "\n"
    ids = tokenize_cached([path], bpe_tokenizer)
    assert bpe_tokenizer.decode(ids.tolist()) == text


# ---- the token cache --------------------------------------------------------------------------


def test_a_file_edited_between_runs_is_noticed(tmp_path, shakespeare, bpe_tokenizer):
    """Same size, same mtime, different bytes: the second run tokenizes the new text."""
    path = _write(tmp_path / "corpus.txt", shakespeare[:20_000].encode())
    first = CustomDataset(path, bpe_tokenizer, 32)
    stat = path.stat()
    edited = shakespeare[:20_000].replace("Citizen", "Citizan")
    assert len(edited) == 20_000 and edited != shakespeare[:20_000]
    path.write_text(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = CustomDataset(path, bpe_tokenizer, 32)
    assert not np.array_equal(np.asarray(first.ids), np.asarray(second.ids))
    all_ids = tokenize_cached([path], bpe_tokenizer)
    assert bpe_tokenizer.decode(all_ids.tolist()) == edited
    # both entries live in $GPTKIT_CACHE_DIR/tokens, nowhere else
    assert default_cache_dir() == tmp_path / "cache" / "tokens"
    assert len(list(default_cache_dir().glob("*.bin"))) == 2


@pytest.mark.parametrize("damage", ["truncated-bin", "missing-bin", "garbage-json"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, shakespeare, bpe_tokenizer, damage):
    path = _write(tmp_path / "corpus.txt", shakespeare[:20_000].encode())
    good = np.array(tokenize_cached([path], bpe_tokenizer))
    (bin_path,) = default_cache_dir().glob("*.bin")
    if damage == "truncated-bin":
        bin_path.write_bytes(bin_path.read_bytes()[:101])
    elif damage == "missing-bin":
        bin_path.unlink()
    else:
        bin_path.with_suffix(".json").write_text("{not json")
    assert np.array_equal(np.array(tokenize_cached([path], bpe_tokenizer)), good)


def test_resolve_text_files_library_errors_are_data_errors(tmp_path):
    """The API raises the typed error the CLI prints (DataError, a GptkitError and ValueError)."""
    with pytest.raises(DataError, match="does not exist"):
        resolve_text_files([tmp_path / "nope"])
    with pytest.raises(DataError, match="no data files given"):
        resolve_text_files([])
