"""GPTConfig: the shape of a model, validated, with named presets and a JSON round trip.

The same JSON travels inside checkpoints (``config.json``) and inside exported ONNX files, so
the runtime can rebuild the KV-cache shapes without PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from runtime.errors import ConfigError

INIT_SCHEMES = ("gpt2", "neox", "xavier")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's tokenizer; a trained BPE sets its own size
    block_size: int = 1024  # context length: the number of learned position embeddings
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # must divide evenly into n_head heads
    dropout: float = 0.0  # 0.0 for pretraining large models; ~0.1-0.2 for small data
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has them
    init: str = "gpt2"  # weight init scheme, one of INIT_SCHEMES (see gpt_core.model)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ConfigError(f"dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false, got {self.bias!r}")
        if self.init not in INIT_SCHEMES:
            raise ConfigError(
                f"unknown init scheme {self.init!r}; choose one of {', '.join(INIT_SCHEMES)}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown model config key(s): {', '.join(sorted(unknown))}; "
                f"valid keys are {', '.join(sorted(known))}"
            )
        if (
            "dropout" in data
            and isinstance(data["dropout"], int)
            and not isinstance(data["dropout"], bool)
        ):
            data = {**data, "dropout": float(data["dropout"])}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> GPTConfig:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"model config is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (see PRESETS), optionally with some fields changed."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)


PRESETS: dict[str, GPTConfig] = {
    # 2 layers, 64 wide: fast enough for every test.
    "tiny": GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64),
    # `gptkit train`'s default: sized for a laptop's CPU and Tiny Shakespeare, with the 2,048-id
    # BPE trained on it (the README quotes what the default run reaches).
    "small-cpu": GPTConfig(
        vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=256, dropout=0.1
    ),
    # GPT-2 small (124M) and medium (350M), as OpenAI released them.
    "gpt2": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
}
