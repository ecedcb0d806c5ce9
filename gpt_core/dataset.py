"""CustomDataset: text files -> token ids on disk (memmap) -> (input, target) windows.

Tokenizing happens once: ids are cached as a flat ``.bin`` memmap (uint16 when the vocabulary fits,
else uint32) keyed by the content hash of the files and the tokenizer's fingerprint, so the next
run with the same data starts at once, and a changed file is noticed. Files are read and tokenized in
chunks, so corpora larger than RAM work; nothing ever holds all ids in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from runtime.errors import DataError
from runtime.files import atomic_write_bytes, gptkit_cache_dir
from runtime.tokenizer import Tokenizer

CHUNK_BYTES = 1 << 20  # tokenize 1 MiB at a time (split at a line boundary)
TEXT_SUFFIXES = (".txt", ".md", ".text")
BUNDLED_CORPUS = "tinyshakespeare.txt.gz"


def default_cache_dir() -> Path:
    return gptkit_cache_dir() / "tokens"


def bundled_corpus_path() -> Path:
    """Tiny Shakespeare (public domain, 1.1 MB), decompressed once into the cache directory."""
    target = default_cache_dir().parent / "tinyshakespeare.txt"
    if not target.exists():
        data = gzip.decompress(
            resources.files("gpt_core").joinpath("data", BUNDLED_CORPUS).read_bytes()
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)  # several DDP ranks may get here at once
    return target


def resolve_text_files(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> list[Path]:
    """Expand files and directories (their text files, sorted) into a list of files; errors are one line."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(
                f"data path {path} does not exist; pass a text file or a directory of .txt files"
            )
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
            )
            found = [p for p in found if p.stat().st_size > 0]  # empty files add nothing
            if not found:
                raise DataError(
                    f"directory {path} has no non-empty text files ({', '.join(TEXT_SUFFIXES)})"
                )
            files.extend(found)
        elif path.stat().st_size == 0:
            raise DataError(f"{path} is empty; give it some text to train on")
        else:
            files.append(path)
    if not files:
        raise DataError("no data files given; pass a text file or a directory of .txt files")
    return files


def read_text(files: Sequence[Path], limit: int | None = None) -> str:
    """The files' text (validated as UTF-8), joined by newlines; at most about ``limit`` characters."""
    parts, total = [], 0
    for file in files:
        for chunk in _utf8_chunks(file):
            parts.append(chunk)
            total += len(chunk)
            if limit is not None and total >= limit:
                return "".join(parts)
        parts.append("\n")
    return "".join(parts)


class CustomDataset(torch.utils.data.Dataset):
    """(input, target) windows of ``block_size`` tokens over one split of a tokenized corpus.

    The corpus is tokenized once into a memmap (see :func:`tokenize_cached`); the last
    ``val_fraction`` of its tokens is the validation split, the rest the training split.

    ``x, y = CustomDataset("input.txt", tokenizer, block_size=128)[0]`` gives one window: ``y``
    is ``x`` shifted left by one token.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        tokenizer: Tokenizer,
        block_size: int,
        *,
        split: str = "train",
        val_fraction: float = 0.1,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        self.files = resolve_text_files(paths)
        self.tokenizer = tokenizer
        self.block_size = block_size
        all_ids = tokenize_cached(self.files, tokenizer, cache_dir)
        n = len(all_ids)
        n_val = max(block_size + 1, int(n * val_fraction))
        if n - n_val < block_size + 1:
            raise DataError(
                f"the corpus has only {n} tokens, too few for block_size {block_size} plus a "
                "validation split; give more text or a smaller --block-size"
            )
        cut = n - n_val
        # A slice of the memmap, so the ids stay on disk (numpy types the slice as an ndarray).
        self.ids: np.ndarray = all_ids[:cut] if split == "train" else all_ids[cut:]

    def __len__(self) -> int:
        """Number of non-overlapping windows (one epoch)."""
        return (len(self.ids) - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.window(index * self.block_size)

    def window(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``start .. start+block_size`` and the same shifted by one (the targets)."""
        chunk = torch.from_numpy(
            np.asarray(self.ids[start : start + self.block_size + 1], dtype=np.int64)
        )
        return chunk[:-1], chunk[1:]

    def batch(self, starts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A (B, block_size) batch of inputs and targets at the given window starts."""
        xs, ys = zip(*(self.window(int(s)) for s in starts), strict=True)
        return torch.stack(xs), torch.stack(ys)

    def epoch_starts(self, epoch: int, seed: int) -> np.ndarray:
        """Window starts for one epoch: a shuffled tiling with a random phase, a pure function
        of (seed, epoch), so a resumed run sees exactly the batches it would have seen."""
        rng = np.random.default_rng([seed, epoch])
        phase = int(rng.integers(0, self.block_size))
        # The same count whatever the phase, so every epoch has the same number of full batches.
        n = max(1, (len(self.ids) - self.block_size) // self.block_size)
        return phase + self.block_size * rng.permutation(n)

    def eval_starts(self, max_windows: int | None = None) -> list[int]:
        """Fixed, evenly spread window starts (all windows when ``max_windows`` is None)."""
        n = len(self)
        count = n if max_windows is None else min(n, max_windows)
        return (np.linspace(0, n - 1, count).round().astype(np.int64) * self.block_size).tolist()


def token_char_counts(tokenizer: Tokenizer) -> np.ndarray:
    """Characters each token id contributes to UTF-8 text: its bytes that start a character.

    Summed over a span of targets this gives the exact number of characters they cover, so
    bits per character = summed cross-entropy / ln 2 / characters, whatever the tokenizer.
    """
    counts = np.zeros(tokenizer.n_vocab, dtype=np.int64)
    for token_id in range(tokenizer.n_vocab):
        try:
            data = tokenizer.token_bytes(token_id)
        except Exception:  # ids with no bytes (gaps, special tokens) cover no text
            continue
        counts[token_id] = sum(1 for b in data if b & 0xC0 != 0x80)
    return counts


def tokenize_cached(
    files: Sequence[Path], tokenizer: Tokenizer, cache_dir: str | os.PathLike[str] | None = None
) -> np.memmap:
    """Token ids of ``files`` (separated by <|endoftext|>), read from the cache or built once.

    The cache file is named by a hash of the files' bytes and the tokenizer's fingerprint, so an
    edited file or another tokenizer gets a new cache entry instead of stale ids.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(files, tokenizer)
    bin_path, meta_path = cache / f"{key}.bin", cache / f"{key}.json"
    cached = _open_cached(bin_path, meta_path)
    if cached is not None:
        return cached
    dtype = np.dtype(np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_suffix(f".tmp{os.getpid()}")
    n_tokens = 0
    try:
        with open(tmp, "wb") as out:
            for i, file in enumerate(files):
                if i > 0 and tokenizer.eot_token >= 0:
                    out.write(np.array([tokenizer.eot_token], dtype=dtype).tobytes())
                    n_tokens += 1
                for chunk in _utf8_chunks(file):
                    ids = np.asarray(tokenizer.encode(chunk), dtype=dtype)
                    out.write(ids.tobytes())
                    n_tokens += len(ids)
        os.replace(tmp, bin_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {
        "n_tokens": n_tokens,
        "dtype": dtype.name,
        "files": [str(f) for f in files],
        "tokenizer": tokenizer.fingerprint(),
    }
    atomic_write_bytes(meta_path, json.dumps(meta).encode())
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))


def _open_cached(bin_path: Path, meta_path: Path) -> np.memmap | None:
    """The cached ids, or None when the entry is missing or damaged (it is then rebuilt)."""
    try:
        meta = json.loads(meta_path.read_text())
        dtype, n_tokens = np.dtype(meta["dtype"]), int(meta["n_tokens"])
        if bin_path.stat().st_size != n_tokens * dtype.itemsize or n_tokens == 0:
            return None
        return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_key(files: Sequence[Path], tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256(tokenizer.fingerprint().encode())
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                digest.update(block)
        digest.update(b"\x00file\x00")
    return digest.hexdigest()[:24]


def _utf8_chunks(file: Path) -> Iterator[str]:
    """Decode ``file`` in ~1 MiB chunks ending at a newline; invalid UTF-8 names file and offset."""
    offset = 0
    carry = b""
    with open(file, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            data = carry + block
            if not data:
                return
            if block:
                cut = data.rfind(b"\n") + 1 or _utf8_boundary(data)
                data, carry = data[:cut], data[cut:]
            else:
                carry = b""
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{file} is not UTF-8 text (invalid byte at offset {offset + e.start}); "
                    "convert it to UTF-8 first"
                ) from None
            if "\x00" in text:
                at = offset + data.index(b"\x00")
                raise DataError(
                    f"{file} looks like a binary file (NUL byte at offset {at}); pass text files"
                )
            offset += len(data)
            yield text


def _utf8_boundary(data: bytes) -> int:
    """The largest prefix length of ``data`` that does not end inside a multi-byte character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if byte >= 0xC0:  # lead byte of a 2-, 3- or 4-byte sequence
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if needed > back else len(data)
        return len(data)
    return len(data)
