"""GPTConfig: every invalid value is a one-line ConfigError; presets and JSON round-trip.

And TrainConfig's torch-free module: its import and the resume rule.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_core.config import INIT_SCHEMES, PRESETS, GPTConfig
from gpt_core.train_config import RESUME_FIXED, TrainConfig, check_resume
from runtime.errors import ConfigError, GptkitError


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_embd": 100, "n_head": 3}, "divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be positive"),
        ({"n_head": -2}, "n_head must be positive"),
        ({"vocab_size": 0}, "vocab_size must be positive"),
        ({"block_size": -1}, "block_size must be positive"),
        ({"n_embd": 64.0}, "n_embd must be an integer"),
        ({"n_layer": "2"}, "n_layer must be an integer"),
        ({"n_layer": True}, "n_layer must be an integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"dropout": "0.1"}, "dropout must be a number"),
        ({"bias": 1}, "bias must be true or false"),
        ({"init": "kaiming"}, "unknown init scheme 'kaiming'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_values_raise_config_error(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        GPTConfig.preset("tiny", **changes)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, GptkitError)


def test_divisibility_error_suggests_a_size() -> None:
    with pytest.raises(ConfigError, match="try n_embd=63"):
        GPTConfig(n_embd=64, n_head=3)


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown model config key.*n_embed"):
        GPTConfig.from_dict({**GPTConfig().to_dict(), "n_embed": 768})
    with pytest.raises(ConfigError, match="unknown config field.*layers"):
        GPTConfig().replace(layers=3)


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*tiny"):
        GPTConfig.preset("gpt5")


def test_bad_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        GPTConfig.from_json("{")
    with pytest.raises(ConfigError, match="JSON object"):
        GPTConfig.from_json("[1, 2]")


@pytest.mark.parametrize("name", ["tiny", "small-cpu", "gpt2", "gpt2-medium"])
def test_presets_round_trip_through_json(name: str) -> None:
    config = PRESETS[name]
    assert GPTConfig.preset(name) == config
    assert GPTConfig.from_json(config.to_json()) == config
    assert GPTConfig.from_dict(json.loads(config.to_json())) == config


def test_preset_shapes() -> None:
    assert set(PRESETS) >= {"tiny", "small-cpu", "gpt2", "gpt2-medium"}
    tiny = PRESETS["tiny"]
    assert (tiny.n_layer, tiny.n_embd) == (2, 64)
    gpt2 = PRESETS["gpt2"]
    assert (gpt2.vocab_size, gpt2.block_size, gpt2.n_layer, gpt2.n_head, gpt2.n_embd) == (
        50257,
        1024,
        12,
        12,
        768,
    )
    medium = PRESETS["gpt2-medium"]
    assert (medium.n_layer, medium.n_head, medium.n_embd) == (24, 16, 1024)


def test_integer_dropout_from_json_becomes_float() -> None:
    config = GPTConfig.from_json(json.dumps({**PRESETS["tiny"].to_dict(), "dropout": 0}))
    assert config.dropout == 0.0 and isinstance(config.dropout, float)


def test_config_is_frozen_and_replace_validates() -> None:
    config = GPTConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_layer = 3  # type: ignore[misc]
    assert config.replace(n_layer=3).n_layer == 3
    assert config.n_layer == 2
    with pytest.raises(ConfigError):
        config.replace(n_head=5)
    assert config.head_dim == 32


@pytest.mark.parametrize("init", INIT_SCHEMES)
def test_every_init_scheme_is_accepted(init: str) -> None:
    assert GPTConfig.preset("tiny", init=init).init == init


def test_train_config_and_the_train_command_import_without_torch() -> None:
    """The CLI reads its defaults from gpt_core.train_config, so neither may need PyTorch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import gpt_core.train_config, gpt_core.train_events, gptkit.train_cmd\n"
        "print(sorted(m for m in ('torch', 'onnxruntime') if sys.modules.get(m)))"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_resume_rule_compares_only_what_was_asked_for() -> None:
    run = Path("r")
    saved_model = {**PRESETS["tiny"].to_dict(), "vocab_size": 300, "block_size": 32}
    saved_train = {**dataclasses.asdict(TrainConfig()), "max_steps": 2, "seed": 5}
    # defaults and no shape: nothing asked, the run's values win
    check_resume(run, saved_model, saved_train, None, TrainConfig(out_dir="r"))
    # the run's own shape and values (vocab_size is the tokenizer's, never compared)
    same = GPTConfig.preset("tiny", block_size=32)
    check_resume(run, saved_model, saved_train, same, TrainConfig(max_steps=2, seed=5))
    # fields outside RESUME_FIXED belong to the session
    check_resume(run, saved_model, saved_train, None, TrainConfig(device="cpu", threads=1))
    with pytest.raises(ConfigError) as info:
        check_resume(run, saved_model, saved_train, None, TrainConfig(seed=6))
    assert str(info.value) == (
        "the run in r has seed 5, not 6; --resume keeps the run's settings "
        "(drop the flag, or start a new run with --init-from r)"
    )
    # a longer run is the one change a resume takes: it continues past its end
    kept = check_resume(run, saved_model, saved_train, None, TrainConfig(max_steps=9))
    assert kept["max_steps"] == 9 and kept["seed"] == 5
    with pytest.raises(ConfigError, match="has n_embd 64, not 128"):
        check_resume(run, saved_model, saved_train, same.replace(n_embd=128), TrainConfig())


def test_train_config_fields_are_in_the_resume_rule_or_the_session() -> None:
    session = {"out_dir", "log_interval", "sample_tokens", "sample_prompt", "precision", "device"}
    session |= {"compile", "threads", "log"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RESUME_FIXED) | session == fields and not set(RESUME_FIXED) & session
