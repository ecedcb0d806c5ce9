"""What an exported gptkit .onnx file carries in its metadata, and how it is read back.

The exporter writes these string properties into the ONNX model's ``metadata_props``; the runtime
reads them (through onnxruntime's ``custom_metadata_map``) and needs nothing else to run the model:

    gptkit.format_version  "1"
    gptkit.config          model config JSON (GPTConfig fields: vocab_size, block_size, n_layer, ...)
    gptkit.tokenizer       Tokenizer.to_bytes(): pattern, special tokens and ranks
    gptkit.export          JSON: how and when it was exported (versions, opset, dtype, logits, ...)
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import IO, Any

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
    def kv_dtype(self) -> str:
        """The cache's element type: the activations' (fp32, fp16) or a quantized one (int8)."""
        return str(self.export.get("kv_dtype", self.export.get("dtype", "fp32")))

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


# ModelProto's metadata_props field, a repeated StringStringEntryProto {1: key, 2: value}.
_METADATA_PROPS = 14


def read_props(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The ONNX file's ``metadata_props`` read straight from its protobuf, without onnxruntime.

    Walks the top-level fields and seeks past the rest (the graph with its weights), so it costs
    a few small reads however large the file. It lets loading build the tokenizer while ONNX
    Runtime creates the session. None when the file cannot be read this way; the caller then
    asks the session (which also gives the error for a file that is not ONNX).
    """
    props: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while f.tell() < size:
                number, wire = divmod(_varint(f), 8)
                if wire == 0:
                    _varint(f)
                elif wire in (1, 5):
                    f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
                elif wire == 2:
                    length = _varint(f)
                    if number != _METADATA_PROPS:
                        f.seek(length, os.SEEK_CUR)
                        continue
                    key, value = _entry(f.read(length))
                    props[key] = value
                else:  # groups (wire types 3, 4) never appear in an ONNX model
                    return None
            if f.tell() != size:
                return None
    except (OSError, ValueError):
        return None
    return props


def _varint(f: IO[bytes]) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte or shift > 63:
            raise ValueError("truncated or invalid varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def _entry(data: bytes) -> tuple[str, str]:
    """A StringStringEntryProto's key and value."""
    fields = {1: "", 2: ""}
    f = io.BytesIO(data)
    while f.tell() < len(data):
        number, wire = divmod(_varint(f), 8)
        if wire != 2:
            raise ValueError("unexpected field in a metadata entry")
        raw = f.read(_varint(f))
        if number in fields:
            fields[number] = raw.decode("utf-8")
    return fields[1], fields[2]
