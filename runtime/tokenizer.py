"""A byte-level BPE tokenizer over ``tiktoken.Encoding``, shared by training, export and runtime.

The tokenizer is plain data: a split pattern, mergeable ranks (token bytes -> rank, ranks in merge
order) and special tokens. That data serialises to bytes (:meth:`Tokenizer.to_bytes`), so the same
tokenizer lives inside a training checkpoint and inside an exported ``.onnx`` file, and the runtime
never needs the network.

Two ways to get one:
- train it on your text (``gpt_core.bpe.train_bpe``, part of the training install), or
- ``Tokenizer.gpt2()``: tiktoken's own GPT-2 encoding, when tiktoken can load it (cached or online).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tiktoken

from runtime.errors import TokenizerError
from runtime.files import atomic_write_bytes

# GPT-2's split pattern (tiktoken's r50k pattern): contractions, letters, numbers, punctuation runs
# and whitespace, each optionally led by one space.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"

FORMAT = "gptkit-tokenizer"
TOKENIZER_FORMAT_VERSION = 1
RANKS_FILENAME = "tokenizer.tiktoken"
META_FILENAME = "tokenizer.json"

# Where tiktoken's gpt2 constructor fetches its two files from; their cache names are sha1(url).
_GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
_GPT2_HOST = "openaipublic.blob.core.windows.net"


class Tokenizer:
    """Encode text to token ids and back; round-trips every valid Unicode string.

    >>> tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, name="bytes")
    >>> tok.decode(tok.encode("héllo"))
    'héllo'
    """

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.eot_token: int = encoding.eot_token if ENDOFTEXT in encoding.special_tokens_set else -1

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_ranks(
        cls,
        mergeable_ranks: dict[bytes, int],
        *,
        name: str,
        pattern: str = GPT2_PATTERN,
        special_tokens: dict[str, int] | None = None,
    ) -> Tokenizer:
        """Build from ranks; ``<|endoftext|>`` gets the next free id unless given."""
        if special_tokens is None:
            special_tokens = {ENDOFTEXT: len(mergeable_ranks)}
        _check_ranks(mergeable_ranks, special_tokens)
        try:
            encoding = tiktoken.Encoding(
                name=name,
                pat_str=pattern,
                mergeable_ranks=mergeable_ranks,
                special_tokens=special_tokens,
            )
        except Exception as e:  # tiktoken raises bare ValueError for a bad regex or ranks
            raise TokenizerError(f"cannot build tokenizer {name!r}: {e}") from None
        return cls(encoding)

    @classmethod
    def gpt2(cls, *, timeout: float = 5.0) -> Tokenizer:
        """tiktoken's GPT-2 encoding (50,257 ids), loaded from tiktoken's cache or downloaded.

        Never hangs on the network: when the files are not cached and the host cannot be
        reached within ``timeout`` seconds, raises TokenizerError saying what to do instead.
        """
        if not _gpt2_cached() and not _reachable(_GPT2_HOST, timeout):
            raise TokenizerError(
                "the gpt2 tokenizer is not in tiktoken's cache and the network is unreachable; "
                "pre-fill TIKTOKEN_CACHE_DIR with tiktoken's gpt2 files, import a local Hugging "
                "Face GPT-2 directory, or train a tokenizer on your data (--tokenizer bpe)"
            )
        try:
            return cls(tiktoken.get_encoding("gpt2"))
        except Exception as e:
            raise TokenizerError(f"tiktoken could not load the gpt2 encoding: {e}") from None

    # ---- the tokenizer itself -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.encoding.name

    @property
    def pattern(self) -> str:
        return self.encoding._pat_str

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.encoding._special_tokens)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self.encoding._mergeable_ranks)

    @property
    def n_vocab(self) -> int:
        """Number of ids the tokenizer can decode (ids are 0 .. n_vocab-1)."""
        return self.encoding.n_vocab

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``.

        By default special-token text such as ``"<|endoftext|>"`` is encoded as ordinary text, so
        user text can never inject a control token; ``allow_special=True`` maps it to its id.
        """
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of ``ids`` (no UTF-8 decoding)."""
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise TokenizerError(
                f"token id {bad[0]} is outside this tokenizer's 0..{self.n_vocab - 1}"
            )
        return self.encoding.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; incomplete UTF-8 sequences become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def stream_decoder(self) -> StreamDecoder:
        """An incremental decoder that never emits half a UTF-8 character."""
        return StreamDecoder(self)

    # ---- serialisation ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Self-contained JSON: metadata plus the ranks in tiktoken's file format."""
        doc = self._meta()
        doc["ranks"] = _dump_ranks(self.encoding._mergeable_ranks)
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes | str) -> Tokenizer:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or not isinstance(doc.get("ranks"), str):
                raise TypeError("expected a JSON object with a 'ranks' string")
            ranks = _parse_ranks(doc["ranks"])
        except TokenizerError:
            raise
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise TokenizerError(f"corrupt tokenizer data ({type(e).__name__}: {e})") from None
        return cls._from_meta(doc, ranks)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.tiktoken`` (ranks) and ``tokenizer.json`` (name, pattern, specials)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            directory / RANKS_FILENAME, _dump_ranks(self.encoding._mergeable_ranks).encode("ascii")
        )
        atomic_write_bytes(directory / META_FILENAME, json.dumps(self._meta(), indent=2).encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a directory saved by :meth:`save`, or from its ``tokenizer.json`` or ranks file."""
        path = Path(path)
        if path.is_dir():
            meta_path, ranks_path = path / META_FILENAME, path / RANKS_FILENAME
        elif path.suffix == ".json":
            meta_path, ranks_path = path, path.with_name(RANKS_FILENAME)
        else:
            meta_path, ranks_path = path.with_name(META_FILENAME), path
        if not ranks_path.is_file():
            raise TokenizerError(f"tokenizer ranks file {ranks_path} not found")
        try:
            ranks = _parse_ranks(ranks_path.read_text(encoding="ascii"))
        except (UnicodeDecodeError, OSError) as e:
            raise TokenizerError(f"cannot read tokenizer ranks file {ranks_path}: {e}") from None
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (ValueError, OSError) as e:
                raise TokenizerError(f"corrupt tokenizer metadata {meta_path}: {e}") from None
        else:  # a bare .tiktoken file: GPT-2 pattern, <|endoftext|> after the ranks
            meta = {"name": ranks_path.stem, "special_tokens": {ENDOFTEXT: len(ranks)}}
        return cls._from_meta(meta, ranks)

    def fingerprint(self) -> str:
        """A short hash identifying the exact tokenization (for cache keys)."""
        import hashlib  # here: loading OpenSSL is a visible part of a model's start

        return hashlib.sha256(self.to_bytes()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab})"

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": TOKENIZER_FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
        }

    @classmethod
    def _from_meta(cls, meta: object, ranks: dict[bytes, int]) -> Tokenizer:
        if not isinstance(meta, dict):
            raise TokenizerError("corrupt tokenizer metadata: expected a JSON object")
        version = meta.get("version", TOKENIZER_FORMAT_VERSION)
        if version != TOKENIZER_FORMAT_VERSION:
            raise TokenizerError(
                f"tokenizer format version {version} is not supported (this gptkit reads "
                f"{TOKENIZER_FORMAT_VERSION}); upgrade gptkit"
            )
        specials = meta.get("special_tokens", {ENDOFTEXT: len(ranks)})
        if not isinstance(specials, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in specials.items()
        ):
            raise TokenizerError("corrupt tokenizer metadata: special_tokens must map text to ids")
        pattern = meta.get("pattern", GPT2_PATTERN)
        name = meta.get("name", "bpe")
        if not isinstance(pattern, str) or not isinstance(name, str):
            raise TokenizerError("corrupt tokenizer metadata: name and pattern must be strings")
        return cls.from_ranks(ranks, name=name, pattern=pattern, special_tokens=specials)


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences.

    A multi-byte character split across tokens (emoji, CJK) is emitted whole once its last byte
    arrives; :meth:`flush` returns what is left (invalid leftovers become U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._n_vocab = tokenizer.n_vocab
        self._token_bytes = tokenizer.encoding.decode_single_token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        # Once per generated token: one id's bytes directly, not a list through decode_bytes.
        if not 0 <= token_id < self._n_vocab:
            self._tokenizer.decode_bytes([token_id])  # raises its TokenizerError
        return self._decoder.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _check_ranks(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
    # Special tokens may sit anywhere, not only after the ranks: a Hugging Face tokenizer trained
    # with special tokens puts <|endoftext|> at id 0, and an import must keep HF's ids.
    taken = set(ranks.values())
    if len(taken) != len(ranks):
        raise TokenizerError("tokenizer ranks must be distinct ids")
    if len(ranks) < 256 or any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError("a byte-level tokenizer needs all 256 single bytes in its ranks")
    for token, token_id in special_tokens.items():
        if token_id in taken:
            raise TokenizerError(f"special token {token!r} reuses id {token_id}")
        taken.add(token_id)
    if taken != set(range(len(taken))):
        raise TokenizerError(
            "tokenizer ids (ranks and special tokens) must be 0..n-1, each used once"
        )


def _dump_ranks(ranks: dict[bytes, int]) -> str:
    """tiktoken's ``.tiktoken`` format: ``base64(token) rank`` per line, by rank."""
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}"
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    return "\n".join(lines) + "\n"


# What _dump_ranks writes: "base64 rank" lines. Text of this shape is parsed in bulk.
_CANONICAL_RANKS = re.compile(r"(?:[A-Za-z0-9+/=]+ [0-9]+\n)*[A-Za-z0-9+/=]+ [0-9]+\n?")


def _parse_ranks(text: str) -> dict[bytes, int]:
    # Loading a model builds its tokenizer from here: a 50k-token file in one pass of C calls
    # takes a fifth of the line-by-line loop below, which stays for anything else (and for the
    # line number of an error). Both decode base64 as b64decode(validate=True) does.
    if _CANONICAL_RANKS.fullmatch(text):
        fields = text.split()
        decode = binascii.a2b_base64
        try:
            tokens = [decode(token, strict_mode=True) for token in fields[0::2]]
            return dict(zip(tokens, map(int, fields[1::2]), strict=True))
        except ValueError:  # binascii.Error: let the loop say which line
            pass
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(
                f"corrupt tokenizer ranks at line {lineno}: {line[:40]!r}"
            ) from None
    if not ranks:
        raise TokenizerError("tokenizer ranks are empty")
    return ranks


def _gpt2_cached() -> bool:
    import hashlib
    import tempfile

    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return all(
        os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))
        for url in _GPT2_URLS
    )


def _reachable(host: str, timeout: float) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
