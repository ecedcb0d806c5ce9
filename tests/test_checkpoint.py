"""Checkpoints: round trip, run-directory resolution, atomic swaps, one-line errors naming the file."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from reliability_helpers import one_line_message

from gpt_core import checkpoint as ck
from gpt_core.checkpoint import (
    DEFAULT_RUN_DIR,
    load_model,
    load_training_state,
    save_checkpoint,
    save_model,
)
from gpt_core.model import GPT
from runtime.errors import CheckpointError


def make_model(config, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def same_weights(a: GPT, b: GPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip(tmp_path, tiny_config, bpe_tokenizer) -> None:
    model = make_model(tiny_config, 1)
    save_model(tmp_path / "ckpt", model, bpe_tokenizer, train_config={"lr": 0.1})
    loaded, tokenizer = load_model(tmp_path / "ckpt")
    assert same_weights(model, loaded) and not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    assert tokenizer == bpe_tokenizer
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config == {"model": tiny_config.to_dict(), "train": {"lr": 0.1}}
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.tiktoken"]
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(tmp_path / "ckpt" / "model.safetensors")


def test_compiled_and_ddp_prefixes_are_stripped(tmp_path, tiny_config, bpe_tokenizer) -> None:
    model = make_model(tiny_config, 2)
    compiled = torch.compile(model)  # wraps only; nothing compiles until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    state = ck.model_state_dict(compiled)
    assert not any(k.startswith("_orig_mod.") for k in state)
    save_model(tmp_path / "c", model, bpe_tokenizer)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "c" / "model.safetensors")
    save_file(
        {f"module._orig_mod.{k}": v for k, v in weights.items()},
        tmp_path / "c" / "model.safetensors",
    )
    assert same_weights(model, load_model(tmp_path / "c")[0])


def test_run_directory_prefers_best_then_last(tmp_path, tiny_config, bpe_tokenizer) -> None:
    run = tmp_path / "run"
    first, second, third = (make_model(tiny_config, s) for s in (1, 2, 3))
    save_checkpoint(run, 10, first, bpe_tokenizer, train_config={}, state=None, is_best=True)
    save_checkpoint(run, 20, second, bpe_tokenizer, train_config={}, state=None, is_best=False)
    assert same_weights(load_model(run)[0], first)
    assert same_weights(load_model(run / "last")[0], second)
    save_checkpoint(run, 30, third, bpe_tokenizer, train_config={}, state=None, is_best=False)
    # step 20 was neither best nor last any more: removed; step 10 (best) kept
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "step-000010", "step-000030"]
    os.unlink(run / "best")
    assert same_weights(load_model(run)[0], third)  # no best: last


def test_default_run_dir_and_missing_checkpoints(tmp_path, monkeypatch) -> None:
    assert DEFAULT_RUN_DIR == Path("runs") / "default"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_model()
    assert (
        one_line_message(e) == f"no checkpoint at {DEFAULT_RUN_DIR}; train one with `gptkit train`"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "empty")
    assert "holds no checkpoint" in one_line_message(e)


def test_corrupt_files_are_named(tmp_path, tiny_config, bpe_tokenizer) -> None:
    good = save_model(tmp_path / "good", make_model(tiny_config, 1), bpe_tokenizer)

    def broken(name: str, edit) -> Path:
        target = tmp_path / f"broken-{len(list(tmp_path.iterdir()))}"
        target.mkdir()
        for file in good.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        edit(target / name)
        return target

    weights = broken("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000]))
    with pytest.raises(CheckpointError) as e:
        load_model(weights)
    assert f"{weights / 'model.safetensors'} is corrupt or truncated" in one_line_message(e)
    config = broken("config.json", lambda p: p.write_text('{"model": '))
    with pytest.raises(CheckpointError) as e:
        load_model(config)
    assert f"{config / 'config.json'} is not valid JSON" in one_line_message(e)
    tokenizer = broken("tokenizer.json", lambda p: p.unlink())
    with pytest.raises(CheckpointError) as e:
        load_model(tokenizer)
    assert f"{tokenizer / 'tokenizer.json'} is missing" in one_line_message(e)
    other = broken(
        "config.json",
        lambda p: p.write_text(json.dumps({"model": {**tiny_config.to_dict(), "n_layer": 3}})),
    )
    with pytest.raises(CheckpointError) as e:
        load_model(other)
    assert "does not match its config" in one_line_message(e)


def test_training_state_is_loaded_without_pickle(tmp_path, tiny_config, bpe_tokenizer) -> None:
    run = tmp_path / "run"
    state = {"step": 3, "rng": torch.get_rng_state(), "optimizer": {"lr": [0.1]}}
    path = save_checkpoint(
        run,
        3,
        make_model(tiny_config, 1),
        bpe_tokenizer,
        train_config={},
        state=state,
        is_best=True,
    )
    loaded = load_training_state(path)
    assert loaded["step"] == 3 and torch.equal(loaded["rng"], state["rng"])

    buffer = io.BytesIO()
    torch.save({"payload": Path("not-allowed")}, buffer)  # an arbitrary object: refused
    (path / "state.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError) as e:
        load_training_state(path)
    assert f"{path / 'state.pt'} is corrupt or truncated" in one_line_message(e)
    (path / "state.pt").write_bytes(buffer.getvalue()[:50])
    with pytest.raises(CheckpointError):
        load_training_state(path)
    (path / "state.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        load_training_state(path)
    assert "has no training state" in one_line_message(e)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(
    tmp_path, tiny_config, bpe_tokenizer, monkeypatch
) -> None:
    run = tmp_path / "run"
    first = make_model(tiny_config, 1)
    save_checkpoint(run, 1, first, bpe_tokenizer, train_config={}, state={"step": 1}, is_best=True)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed halfway through writing the tokenizer

    monkeypatch.setattr(type(bpe_tokenizer), "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(
            run,
            2,
            make_model(tiny_config, 2),
            bpe_tokenizer,
            train_config={},
            state={"step": 2},
            is_best=True,
        )
    monkeypatch.undo()
    assert same_weights(load_model(run)[0], first)
    assert load_training_state(ck.resolve_checkpoint(run / "last"))["step"] == 1
    # the next save cleans up the half-written directory and succeeds
    save_checkpoint(
        run, 2, make_model(tiny_config, 2), bpe_tokenizer, train_config={}, state=None, is_best=True
    )
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "step-000002"]


def test_without_symlinks_best_and_last_are_copies(
    tmp_path, tiny_config, bpe_tokenizer, monkeypatch
) -> None:
    def no_symlinks(*args, **kwargs):
        raise OSError("symbolic links are not available")

    monkeypatch.setattr(ck.os, "symlink", no_symlinks)
    run = tmp_path / "run"
    first, second = make_model(tiny_config, 1), make_model(tiny_config, 2)
    save_checkpoint(run, 1, first, bpe_tokenizer, train_config={}, state=None, is_best=True)
    save_checkpoint(run, 2, second, bpe_tokenizer, train_config={}, state=None, is_best=False)
    assert not (run / "best").is_symlink() and (run / "best").is_dir()
    assert sorted(p.name for p in run.iterdir()) == ["best", "last"]
    assert same_weights(load_model(run)[0], first)
    assert same_weights(load_model(run / "last")[0], second)
