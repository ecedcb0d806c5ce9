"""Train a byte-level BPE tokenizer on the user's text.

Training runs in Hugging Face ``tokenizers`` (Rust, fast); the result is converted to tiktoken
ranks in merge order, so encoding happens in tiktoken everywhere else. The pre-tokenizer is the exact
GPT-2 split pattern tiktoken uses, so both libraries cut text into the same pieces.
This module belongs to the training install: ``tokenizers`` is imported only here.
"""

from __future__ import annotations

from collections.abc import Iterable

from runtime.errors import TokenizerError, require
from runtime.tokenizer import ENDOFTEXT, GPT2_PATTERN, Tokenizer


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    name: str = "bpe",
    pattern: str = GPT2_PATTERN,
    min_frequency: int = 2,
) -> Tokenizer:
    """Learn ``vocab_size - 1`` byte-level BPE ranks (256 bytes plus merges) and ``<|endoftext|>``.

    The vocabulary may end smaller than asked when the text runs out of pairs seen
    ``min_frequency`` times; ``Tokenizer.n_vocab`` is the real size.
    """
    if vocab_size < 257:
        raise TokenizerError(
            f"vocab_size must be at least 257 (256 bytes + <|endoftext|>), got {vocab_size}"
        )
    hf = train_hf_bpe(texts, vocab_size - 1, pattern=pattern, min_frequency=min_frequency)
    return Tokenizer.from_ranks(ranks_from_merges(_merges_of(hf)), name=name, pattern=pattern)


def train_hf_bpe(texts: Iterable[str], n_ranks: int, *, pattern: str, min_frequency: int):
    """The Hugging Face ``tokenizers`` BPE that :func:`train_bpe` converts (tests compare both)."""
    require("tokenizers", extra="train", purpose="training a BPE tokenizer")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_ranks,  # <|endoftext|> is added on the tiktoken side
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return hf


def ranks_from_merges(merges: Iterable[tuple[str, str]]) -> dict[bytes, int]:
    """tiktoken ranks from GPT-2-style merges (byte-level unicode strings), in merge order."""
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}

    def to_bytes(piece: str) -> bytes:
        try:
            return bytes(byte_of[ch] for ch in piece)
        except KeyError:
            raise TokenizerError(f"merge piece {piece!r} is not byte-level BPE text") from None

    ranks = {bytes([b]): b for b in range(256)}
    for left, right in merges:
        token = to_bytes(left) + to_bytes(right)
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (used in merges.txt)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merges_of(hf_tokenizer) -> list[tuple[str, str]]:
    import json

    model = json.loads(hf_tokenizer.to_str())["model"]
    merges = []
    for merge in model["merges"]:  # "left right" strings, or [left, right] pairs in newer files
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merges.append((left, right))
    return merges


__all__ = ["ENDOFTEXT", "bytes_to_unicode", "ranks_from_merges", "train_bpe"]
