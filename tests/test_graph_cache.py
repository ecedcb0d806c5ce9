"""The optimised-graph cache: built once, reused, rebuilt when stale, never a reason to fail.

Runs against the tiny model (or the prebuilt one in CI's torch-free venv); the size threshold is
lowered so the tiny file qualifies. No timing here: benchmarks/decode.py measures the load time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from runtime_helpers import Exported, prebuilt_or_tiny

from runtime import graph_cache
from runtime.model import load
from runtime.session import OnnxSession

PROMPT = "ROMEO: What"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return prebuilt_or_tiny(tmp_path_factory)


@pytest.fixture
def model_file(exported: Exported, tmp_path: Path) -> Path:
    """A private copy of the model (tests change its mtime), in a fresh cache directory."""
    path = tmp_path / "model.onnx"
    shutil.copyfile(exported.path, path)
    return path


@pytest.fixture(autouse=True)
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(root))
    monkeypatch.delenv(graph_cache.DISABLE_ENV, raising=False)
    monkeypatch.setattr(graph_cache, "MIN_BYTES", 0)
    return root


def greedy(path: Path, **kwargs) -> list[int]:
    return load(path, **kwargs).complete(PROMPT, max_new_tokens=12, temperature=0).token_ids


def entries(root: Path) -> list[Path]:
    return sorted((root / "ort").iterdir()) if (root / "ort").is_dir() else []


def test_first_load_builds_an_entry_and_the_second_uses_it(
    model_file: Path, cache_env: Path, monkeypatch: pytest.MonkeyPatch
):
    plain = greedy(model_file, cache=False)
    assert entries(cache_env) == []

    first = OnnxSession(model_file)
    assert first.cached
    (entry,) = entries(cache_env)
    assert {p.name for p in entry.iterdir()} == {"model.onnx", "model.onnx.data", "stamp.json"}
    stamp = json.loads((entry / "stamp.json").read_text())
    assert stamp["source"] == str(model_file.resolve())
    assert stamp["size"] == model_file.stat().st_size

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a current entry was rebuilt")

    monkeypatch.setattr(graph_cache, "_build", no_rebuild)
    assert OnnxSession(model_file).cached
    assert greedy(model_file) == plain  # same tokens through the cached graph


def test_a_changed_file_replaces_its_entry(model_file: Path, cache_env: Path):
    OnnxSession(model_file)
    (entry,) = entries(cache_env)
    before = json.loads((entry / "stamp.json").read_text())
    stat = model_file.stat()
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "re-exported"
    assert OnnxSession(model_file).cached
    (entry_after,) = entries(cache_env)  # still one entry per model path
    after = json.loads((entry_after / "stamp.json").read_text())
    assert after["mtime_ns"] == before["mtime_ns"] + 10**9


@pytest.mark.parametrize("damage", ["truncate-data", "garbage-model", "bad-stamp"])
def test_a_damaged_entry_is_rebuilt(model_file: Path, cache_env: Path, damage: str):
    plain = greedy(model_file, cache=False)
    OnnxSession(model_file)
    (entry,) = entries(cache_env)
    if damage == "truncate-data":
        with open(entry / "model.onnx.data", "r+b") as f:
            f.truncate(100)
    elif damage == "garbage-model":
        (entry / "model.onnx").write_bytes(b"not a model")
    else:
        (entry / "stamp.json").write_text("{")
    assert greedy(model_file) == plain
    assert graph_cache.Entry(model_file).is_current()


def test_an_unusable_cache_directory_falls_back_to_a_plain_load(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(blocker))
    session = OnnxSession(model_file)
    assert not session.cached
    assert greedy(model_file) == greedy(model_file, cache=False)


def test_opting_out_writes_nothing(
    model_file: Path, cache_env: Path, monkeypatch: pytest.MonkeyPatch
):
    assert not OnnxSession(model_file, cache=False).cached
    monkeypatch.setenv(graph_cache.DISABLE_ENV, "0")
    assert not OnnxSession(model_file).cached
    assert entries(cache_env) == []


def test_only_cpu_sessions_at_full_optimisation_use_it(model_file: Path, cache_env: Path):
    assert not OnnxSession(model_file, optimization="basic").cached
    assert entries(cache_env) == []


def test_small_files_skip_the_cache(
    model_file: Path, cache_env: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(graph_cache, "MIN_BYTES", model_file.stat().st_size + 1)
    assert not OnnxSession(model_file).cached
    assert entries(cache_env) == []


def test_no_staging_directory_is_left_behind(model_file: Path, cache_env: Path):
    OnnxSession(model_file)
    assert [p.name for p in (cache_env / "ort").iterdir() if p.name.startswith(".")] == []


def test_a_bad_model_file_is_still_a_one_line_error(tmp_path: Path, cache_env: Path):
    from runtime.errors import ModelFileError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        OnnxSession(bad)
    assert [p for p in entries(cache_env) if not p.name.startswith(".")] == []


def test_building_an_entry_prunes_those_of_deleted_or_changed_files(
    model_file: Path, cache_env: Path, tmp_path: Path
):
    other = tmp_path / "other.onnx"
    shutil.copyfile(model_file, other)
    changed = tmp_path / "changed.onnx"
    shutil.copyfile(model_file, changed)
    OnnxSession(other)
    OnnxSession(changed)
    assert len(entries(cache_env)) == 2
    other.unlink()  # its entry is now useless
    with open(changed, "ab") as f:  # and this one is stale
        f.write(b"\0")
    OnnxSession(model_file)  # builds a new entry, which prunes
    (kept,) = entries(cache_env)
    assert json.loads((kept / "stamp.json").read_text())["source"] == str(model_file.resolve())
