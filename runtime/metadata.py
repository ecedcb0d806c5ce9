"""What an exported gptkit .onnx file carries in its metadata, and how it is read back.

The exporter writes these string properties into the ONNX model's ``metadata_props``; the runtime
reads them (through onnxruntime's ``custom_metadata_map``) and needs nothing else to run the model:

    gptkit.format_version  "1"
    gptkit.config          model config JSON (GPTConfig fields: vocab_size, block_size, n_layer, ...)
    gptkit.tokenizer       Tokenizer.to_bytes(): pattern, special tokens and ranks
    gptkit.export          JSON: how and when it was exported (versions, opset, dtype, logits, ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import ModelFileError, TokenizerError
from runtime.onnx_contract import KV_CONCAT
from runtime.tokenizer import Tokenizer

MODEL_FORMAT_VERSION = 1
KEY_FORMAT = "gptkit.format_version"
KEY_CONFIG = "gptkit.config"
KEY_TOKENIZER = "gptkit.tokenizer"
KEY_EXPORT = "gptkit.export"

# Model config fields the runtime needs to build KV-cache shapes and check the context limit.
REQUIRED_CONFIG_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


@dataclass(frozen=True)
class ModelMetadata:
    config: dict[str, Any]  # the GPTConfig as a plain dict (the runtime does not import gpt_core)
    tokenizer: Tokenizer
    export: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layer(self) -> int:
        return int(self.config["n_layer"])

    @property
    def n_head(self) -> int:
        return int(self.config["n_head"])

    @property
    def head_dim(self) -> int:
        return int(self.config["n_embd"]) // int(self.config["n_head"])

    @property
    def block_size(self) -> int:
        return int(self.config["block_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def kv_cache(self) -> str:
        return str(self.export.get("kv_cache", KV_CONCAT))

    def to_props(self) -> dict[str, str]:
        """The string properties to store in the ONNX file."""
        return {
            KEY_FORMAT: str(MODEL_FORMAT_VERSION),
            KEY_CONFIG: json.dumps(self.config, sort_keys=True),
            KEY_TOKENIZER: self.tokenizer.to_bytes().decode("ascii"),
            KEY_EXPORT: json.dumps(self.export, sort_keys=True),
        }

    @classmethod
    def from_props(cls, props: dict[str, str], *, source: str = "model") -> ModelMetadata:
        """Parse and validate; any problem is a one-line ModelFileError naming ``source``."""
        if KEY_FORMAT not in props:
            raise ModelFileError(
                f"{source} has no gptkit metadata (not exported by gptkit); "
                "re-create it with `gptkit export`"
            )
        version = props[KEY_FORMAT]
        if version != str(MODEL_FORMAT_VERSION):
            raise ModelFileError(
                f"{source} has gptkit format version {version!r}, this gptkit reads "
                f"{MODEL_FORMAT_VERSION}; re-export it with this version of gptkit"
            )
        config = _json_object(props, KEY_CONFIG, source)
        for name in REQUIRED_CONFIG_FIELDS:
            value = config.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelFileError(
                    f"{source} metadata: config field {name!r} is missing or invalid"
                )
        if config["n_embd"] % config["n_head"]:
            raise ModelFileError(f"{source} metadata: n_embd is not divisible by n_head")
        export = _json_object(props, KEY_EXPORT, source) if KEY_EXPORT in props else {}
        if KEY_TOKENIZER not in props:
            raise ModelFileError(f"{source} metadata has no tokenizer; re-export it with gptkit")
        try:
            tokenizer = Tokenizer.from_bytes(props[KEY_TOKENIZER])
        except TokenizerError as e:
            raise ModelFileError(f"{source} metadata: {e}") from None
        if tokenizer.n_vocab > config["vocab_size"]:
            raise ModelFileError(
                f"{source} metadata: tokenizer has {tokenizer.n_vocab} ids but the model only "
                f"{config['vocab_size']}"
            )
        return cls(config=config, tokenizer=tokenizer, export=export)


def _json_object(props: dict[str, str], key: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(props[key])
    except KeyError:
        raise ModelFileError(
            f"{source} metadata is missing {key!r}; re-export it with gptkit"
        ) from None
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than json can parse
        raise ModelFileError(f"{source} metadata {key!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{source} metadata {key!r} is not a JSON object")
    return value
