"""A gptkit tokenizer as Hugging Face GPT-2 tokenizer files, with the same ids and the same splits.

gptkit encodes with tiktoken, which merges by *rank*: at each step the adjacent pair whose
concatenation has the lowest rank. Hugging Face's BPE merges by the *position in its merge list*.
Listing, for every multi-byte token in rank order, the pair tiktoken itself forms it from (run
tiktoken's BPE on the token's bytes with only the lower ranks, as tiktoken's ``data_gym``
conversion and transformers' ``TikTokenConverter`` do) makes both pick the same pair every step:
tiktoken only ever builds a token from that pair, so no other pair is ever needed.

The split pattern: GPT-2's (gptkit's default) is written as GPT-2's own ``ByteLevel``
pre-tokenizer, which every GPT-2 consumer knows (transformers, onnxruntime-genai's tokenizer,
llama.cpp's converter); any other pattern as ``Split(regex)`` + ``ByteLevel``, the layout
``gpt_core.bpe`` trains with. ``gpt_core.hf`` reads both layouts back.

Special tokens: Hugging Face always turns ``<|endoftext|>`` in text into the special id (gptkit's
``encode(text, allow_special=True)``); gptkit's default encodes such text as plain text, which
transformers does with ``tokenizer(text, split_special_tokens=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpt_core.bpe import bytes_to_unicode
from runtime.errors import ExportError, require
from runtime.tokenizer import ENDOFTEXT, GPT2_PATTERN, Tokenizer

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def write_hf_tokenizer(
    tokenizer: Tokenizer, directory: Path, *, model_max_length: int | None = None
) -> list[Path]:
    """Write ``TOKENIZER_FILES`` into ``directory`` (which must exist); returns their paths.

    ``AutoTokenizer.from_pretrained(directory)`` then encodes exactly as ``tokenizer`` does
    (``allow_special=True`` semantics for special-token text, see the module docstring).
    ``model_max_length``: the model's context, recorded in ``tokenizer_config.json``.
    """
    require("tokenizers", extra="train", purpose="writing Hugging Face tokenizer files")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    directory = Path(directory)
    vocab, merges = vocab_and_merges(tokenizer)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    if tokenizer.pattern == GPT2_PATTERN:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        from tokenizers import Regex

        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens(
        [AddedToken(text, special=True, normalized=False) for text, _ in specials]
    )
    for text, token_id in specials:  # add_special_tokens reuses the vocab's id; make sure
        if hf.token_to_id(text) != token_id:
            raise ExportError(
                f"special token {text!r} did not keep id {token_id} in tokenizer.json"
            )

    paths = [directory / name for name in TOKENIZER_FILES]
    try:
        hf.save(str(paths[0]))
        hf.model.save(str(directory))  # vocab.json + merges.txt: the slow GPT-2 tokenizer's files
        _write_json(paths[3], _tokenizer_config(tokenizer, model_max_length))
        _write_json(paths[4], _special_tokens_map(tokenizer))
    except OSError as e:
        raise ExportError(
            f"cannot write tokenizer files to {directory}: {e.strerror or e}"
        ) from None
    return paths


def vocab_and_merges(tokenizer: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2-style vocab (byte-level text -> id, special tokens included) and rank-ordered merges."""
    to_text = bytes_to_unicode()
    ranks = tokenizer.mergeable_ranks
    vocab = {"".join(to_text[b] for b in token): rank for token, rank in ranks.items()}
    for text, token_id in tokenizer.special_tokens.items():
        if text in vocab:
            raise ExportError(
                f"special token {text!r} is also an ordinary token (id {vocab[text]}); Hugging "
                "Face tokenizers cannot keep both"
            )
        vocab[text] = token_id
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        left, right = _last_merge(ranks, token, rank)
        merges.append(("".join(to_text[b] for b in left), "".join(to_text[b] for b in right)))
    return vocab, merges


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The two parts tiktoken joins into ``token``: its BPE using only ranks below ``rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < best_rank:
                best, best_rank = i, pair_rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ExportError(
            f"token {token!r} (id {rank}) cannot be built by merging two lower-ranked tokens, "
            "so it has no Hugging Face merge; this tokenizer is not a BPE merge list"
        )
    return parts[0], parts[1]


def _tokenizer_config(tokenizer: Tokenizer, model_max_length: int | None) -> dict[str, object]:
    eot = ENDOFTEXT if tokenizer.eot_token >= 0 else None
    config: dict[str, object] = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # else decode() rewrites " ." into "." and so on
        "errors": "replace",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": None,
        "added_tokens_decoder": {
            str(token_id): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for text, token_id in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
        },
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def _special_tokens_map(tokenizer: Tokenizer) -> dict[str, object]:
    if tokenizer.eot_token < 0:
        return {}
    return {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}


def _write_json(path: Path, doc: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
