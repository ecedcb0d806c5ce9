"""Import a local Hugging Face GPT-2 checkpoint directory as a gptkit model and tokenizer.

Reads ``config.json``, ``model.safetensors`` (or its sharded index) and the tokenizer files
(``tokenizer.json``, else ``vocab.json`` + ``merges.txt``) directly: no network, no ``transformers``
import, and never a pickle. Our parameter names are GPT-2's, so the mapping is a prefix and a
transpose: Hugging Face stores GPT-2's projections as ``Conv1D`` weights, ``(in, out)``, where
``nn.Linear`` wants ``(out, in)``.

The tokenizer keeps Hugging Face's ids: tiktoken's rank of a token is its HF vocab id (as tiktoken's
``data_gym_to_mergeable_bpe_ranks`` does for GPT-2's own files). That is only the same tokenizer
when the vocab ids grow in merge order, which is checked here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gpt_core.bpe import bytes_to_unicode
from gpt_core.config import GPTConfig
from gpt_core.model import GPT
from runtime.errors import CheckpointError, ConfigError, GptkitError, require
from runtime.tokenizer import ENDOFTEXT, GPT2_PATTERN, Tokenizer

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
# Activations that are GPT-2's tanh-approximated GELU under another name.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Conv1D layers, whose (in, out) weights are transposed into nn.Linear's (out, in).
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Our output head: tied to wte, so Hugging Face's files store it once, as transformer.wte.weight.
HEAD = "lm_head.weight"


def load_hf_gpt2(directory: str | os.PathLike[str]) -> tuple[GPT, Tokenizer]:
    """Load a Hugging Face ``GPT2LMHeadModel`` directory; logits match ``transformers`` (fp32).

    Dropout is 0.0 (HF's pretraining dropout is not wanted for inference); to fine-tune with
    dropout, build ``GPT(model.config.replace(dropout=0.1))`` and load ``model.state_dict()``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass a Hugging Face GPT-2 folder")
    config = hf_config(directory)
    model = GPT(config)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    weights = _our_state_dict(_read_weights(directory), shapes, directory)
    model.load_state_dict(weights, strict=True)
    model.eval()
    tokenizer = hf_tokenizer(directory)
    if tokenizer.n_vocab > config.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {tokenizer.n_vocab} ids but the model only "
            f"{config.vocab_size}; the tokenizer files belong to another model"
        )
    return model, tokenizer


def hf_config(directory: Path) -> GPTConfig:
    """A GPTConfig from HF's ``config.json``, refusing options our GPT does not implement."""
    path = directory / "config.json"
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if "model" in hf and "n_layer" not in hf:
        raise CheckpointError(
            f"{path} is a gptkit checkpoint, not a Hugging Face one; "
            "load it with gpt_core.checkpoint.load_model"
        )
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(
            f"{path}: model_type is {hf['model_type']!r}; only GPT-2 checkpoints can be imported"
        )
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if eps != 1e-5:
        raise CheckpointError(
            f"{path}: layer_norm_epsilon is {eps}, but gptkit's GPT uses 1e-5; "
            "only checkpoints trained with 1e-5 can be imported"
        )
    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELU:
        raise CheckpointError(
            f"{path}: activation_function is {activation!r}, but gptkit's GPT uses GPT-2's "
            "tanh GELU ('gelu_new'); only such checkpoints can be imported"
        )
    n_embd = hf.get("n_embd")
    unsupported = {
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd if isinstance(n_embd, int) else None),
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx")),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "add_cross_attention": bool(hf.get("add_cross_attention")),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is not True,
    }
    for key, bad in unsupported.items():
        if bad:
            raise CheckpointError(
                f"{path}: {key}={hf.get(key)!r} is not supported; gptkit imports standard "
                "GPT-2 (tied embeddings, 4x MLP, 1/sqrt(head_dim) attention)"
            )
    # The sizes as the JSON has them (None when missing): GPTConfig checks every one.
    sizes: dict[str, Any] = {
        "vocab_size": hf.get("vocab_size"),
        "block_size": hf.get("n_positions", hf.get("n_ctx")),
        "n_layer": hf.get("n_layer"),
        "n_head": hf.get("n_head"),
        "n_embd": n_embd,
    }
    try:
        return GPTConfig(**sizes, dropout=0.0, bias=True)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def hf_tokenizer(directory: Path) -> Tokenizer:
    """The checkpoint's byte-level BPE as a gptkit Tokenizer with Hugging Face's ids.

    Prefers ``tokenizer.json`` (it also records the pre-tokenizer), else ``vocab.json`` and
    ``merges.txt`` (the slow GPT-2 tokenizer's files, whose pre-tokenizer is GPT-2's).
    """
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():
        doc = _read_json(tokenizer_json)
        vocab, merges, specials, pattern = _parse_tokenizer_json(doc, tokenizer_json)
        source = tokenizer_json
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        source = directory / "vocab.json"
        vocab = _read_json(source)
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise CheckpointError(f"{source}: expected a JSON object of token -> id")
        merges = _read_merges(directory / "merges.txt")
        specials = _slow_specials(directory, vocab)
        pattern = GPT2_PATTERN
    else:
        raise CheckpointError(
            f"{directory} has no tokenizer.json and no vocab.json + merges.txt; "
            "save the tokenizer with tokenizer.save_pretrained() into the same folder"
        )
    ranks = _ranks_from_vocab(vocab, merges, specials, source)
    try:
        return Tokenizer.from_ranks(
            ranks, name=f"hf-{directory.name}", pattern=pattern, special_tokens=specials
        )
    except GptkitError as e:
        raise CheckpointError(f"{source}: {e}") from None


# ---- weights ------------------------------------------------------------------------------------


def hf_layout(name: str, value: torch.Tensor) -> torch.Tensor:
    """The one name/layout rule, both ways: our parameter names are GPT-2's (``transformer.``
    prefix included), and Conv1D weights are the transpose of nn.Linear's (its own inverse)."""
    return value.t() if name.endswith(CONV1D) else value


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our GPT's state dict as ``GPT2LMHeadModel`` saves it: fp32, contiguous, head left out
    (tied, so transformers rebuilds it from wte; the inverse of :func:`_our_state_dict`)."""
    return {
        name: hf_layout(name, value.detach()).to("cpu", torch.float32).contiguous()
        for name, value in state.items()
        if name != HEAD
    }


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    require("safetensors", extra="train", purpose="importing a Hugging Face checkpoint")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (directory / SAFETENSORS_FILE).is_file():
        files = [directory / SAFETENSORS_FILE]
    elif (directory / SAFETENSORS_INDEX).is_file():
        index = _read_json(directory / SAFETENSORS_INDEX)
        try:
            files = [directory / name for name in sorted(set(index["weight_map"].values()))]
        except (KeyError, AttributeError, TypeError):
            raise CheckpointError(
                f"{directory / SAFETENSORS_INDEX}: no weight_map; re-save the model"
            ) from None
    else:
        pickled = [name for name in PICKLE_FILES if (directory / name).is_file()]
        if pickled:
            raise CheckpointError(
                f"{directory / pickled[0]}: pickle checkpoints are not loaded (unpickling can run "
                'code); convert to safetensors with: python -c "from transformers import '
                f"GPT2LMHeadModel as M; M.from_pretrained('{directory}')"
                f".save_pretrained('{directory}', safe_serialization=True)\""
            )
        raise CheckpointError(
            f"{directory} has no {SAFETENSORS_FILE}; save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    return weights


def _our_state_dict(
    hf: dict[str, torch.Tensor], expected: dict[str, torch.Size], directory: Path
) -> dict[str, torch.Tensor]:
    """Rename, transpose and check HF's tensors against our GPT's state dict shapes (fp32)."""
    state: dict[str, torch.Tensor] = {}
    head = None
    for key, value in hf.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) and name.count(".") == 3:
            continue  # old checkpoints store the causal mask as a buffer; we build our own
        if name == HEAD:
            head = value
            continue
        name = f"transformer.{name}"
        state[name] = hf_layout(name, value).float().contiguous()

    wte = state.get("transformer.wte.weight")
    if wte is not None:
        if head is not None and not torch.equal(head.float(), wte):
            raise CheckpointError(
                f"{directory}: lm_head.weight differs from wte; gptkit's GPT ties them, so "
                "untied GPT-2 variants cannot be imported"
            )
        state[HEAD] = wte
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{directory}: the safetensors weights do not fit its config.json ({detail}); "
            "check that both files come from the same model"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{directory}: weight {key} has shape {tuple(state[key].shape)}, config.json implies "
                f"{tuple(shape)}; check that both files come from the same model"
            )
    return state


# ---- tokenizer ----------------------------------------------------------------------------------


def _parse_tokenizer_json(
    doc: Any, path: Path
) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int], str]:
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CheckpointError(f"{path}: not a Hugging Face BPE tokenizer (model.type != 'BPE')")
    if model.get("byte_fallback") or doc.get("normalizer") is not None:
        raise CheckpointError(
            f"{path}: byte fallback and normalizers are not supported; gptkit imports "
            "byte-level BPE tokenizers such as GPT-2's"
        )
    pattern = _pattern_of(doc.get("pre_tokenizer"), path)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise CheckpointError(f"{path}: model.vocab is missing")
    merges = []
    for merge in model.get("merges", []):
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2):
            raise CheckpointError(f"{path}: malformed merge {merge!r}")
        merges.append((pair[0], pair[1]))
    specials = {}
    for added in doc.get("added_tokens") or []:
        specials[added["content"]] = added["id"]
    return vocab, merges, specials, pattern


def _pattern_of(pre_tokenizer: Any, path: Path) -> str:
    """The split regex that makes tiktoken cut text as this HF pre-tokenizer does."""
    if isinstance(pre_tokenizer, dict):
        kind = pre_tokenizer.get("type")
        if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
            if not pre_tokenizer.get("add_prefix_space", False):
                return GPT2_PATTERN  # HF's ByteLevel regex is GPT-2's
        if kind == "Sequence":
            steps = pre_tokenizer.get("pretokenizers") or []
            if (
                len(steps) == 2
                and steps[0].get("type") == "Split"
                and steps[0].get("behavior") == "Isolated"
                and not steps[0].get("invert")
                and "Regex" in (steps[0].get("pattern") or {})
                and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space", False)
            ):
                return steps[0]["pattern"]["Regex"]  # the layout gpt_core.bpe trains
    raise CheckpointError(
        f"{path}: unsupported pre_tokenizer {json.dumps(pre_tokenizer)[:80]}; gptkit imports "
        "GPT-2-style ByteLevel pre-tokenization without add_prefix_space"
    )


def _slow_specials(directory: Path, vocab: dict[str, int]) -> dict[str, int]:
    """Special tokens beside vocab.json: GPT-2's own ``<|endoftext|>`` entry in the vocab, and
    added tokens, which older transformers wrote to ``added_tokens.json`` or
    ``tokenizer_config.json`` (``added_tokens_decoder``)."""
    specials = {ENDOFTEXT: vocab[ENDOFTEXT]} if ENDOFTEXT in vocab else {}
    if (directory / "added_tokens.json").is_file():
        added = _read_json(directory / "added_tokens.json")
        if not isinstance(added, dict) or not all(isinstance(v, int) for v in added.values()):
            raise CheckpointError(f"{directory / 'added_tokens.json'}: expected token -> id")
        specials.update(added)
    if (directory / "tokenizer_config.json").is_file():
        path = directory / "tokenizer_config.json"
        config = _read_json(path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        if config.get("add_prefix_space"):
            raise CheckpointError(
                f"{path}: add_prefix_space is true; gptkit imports GPT-2's pre-tokenization "
                "without it (set it to false if the model was trained that way)"
            )
        decoder = config.get("added_tokens_decoder") or {}
        try:
            specials.update({entry["content"]: int(i) for i, entry in decoder.items()})
        except (AttributeError, KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed added_tokens_decoder") from None
    return specials


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{path}: line {lineno} is not a merge ('left right')")
        merges.append((pair[0], pair[1]))
    return merges


def _ranks_from_vocab(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    specials: dict[str, int],
    source: Path,
) -> dict[bytes, int]:
    """tiktoken ranks = HF ids, after checking that HF's merge order agrees with those ids.

    tiktoken merges the pair whose result has the lowest rank; HF merges the pair listed first.
    Both pick the same pair only when the merged tokens' ids increase along the merge list.
    """
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}

    def to_bytes(piece: str) -> bytes:
        try:
            return bytes(byte_of[ch] for ch in piece)
        except KeyError:
            raise CheckpointError(
                f"{source}: token {piece!r} is not byte-level BPE text; only byte-level BPE "
                "tokenizers (GPT-2's kind) can be imported"
            ) from None

    made_by_merges = {left + right for left, right in merges}
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        if token in specials:
            if specials[token] != token_id:
                raise CheckpointError(
                    f"{source}: special token {token!r} has two ids ({token_id}, {specials[token]})"
                )
            continue
        if len(token) > 1 and token not in made_by_merges:
            raise CheckpointError(
                f"{source}: vocab token {token!r} is neither a byte nor made by a merge; "
                "list it in added_tokens if it is a special token"
            )
        ranks[to_bytes(token)] = token_id

    previous = -1
    for left, right in merges:
        merged = left + right
        if merged not in vocab:
            raise CheckpointError(f"{source}: merge {left!r} {right!r} makes a token not in vocab")
        if vocab[merged] <= previous:
            raise CheckpointError(
                f"{source}: vocab ids do not follow merge order at {merged!r}; tiktoken needs "
                "ids in merge order, so this tokenizer cannot keep its ids"
            )
        previous = vocab[merged]
    return ranks


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a Hugging Face GPT-2 folder needs it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-save the file") from None
