"""Reliability matrix, export side: bad output paths, bad options, bad checkpoints, faults.

Every case runs `gptkit export OUT --checkpoint CKPT ...` where OUT already holds a good export from
yesterday: afterwards that file must be byte-identical and still load, the checkpoint directory
must be unchanged, and no hidden temp file may be left next to OUT.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from reliability_helpers import digest, one_line_error
from runtime_helpers import Exported, export_tiny

import runtime
from gpt_core.checkpoint import save_model
from gptkit.cli import cli


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Yesterday's good export (a seeded tiny model): what a failed export must leave alone."""
    return export_tiny(tmp_path_factory.mktemp("previous"))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, previous: Exported) -> Path:
    tokenizer = runtime.load(previous.path).tokenizer
    return save_model(
        tmp_path_factory.mktemp("ckpt") / "step-000010", previous.torch_model, tokenizer
    )


@pytest.fixture
def target(tmp_path: Path, previous: Exported) -> Path:
    """tmp_path/out/model.onnx holding the previous good export."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(previous.path, out / "model.onnx")
    return out / "model.onnx"


@pytest.fixture
def checkpoint(tmp_path: Path, good_checkpoint: Path) -> Path:
    """A private copy of the good checkpoint, for cases that damage it."""
    return Path(shutil.copytree(good_checkpoint, tmp_path / "step-000010"))


@pytest.fixture
def gptkit_export(runner: CliRunner) -> Callable[..., Result]:
    """``gptkit export ARGS`` through the shared CliRunner."""
    return lambda *args: runner.invoke(cli, ["export", *args])


def assert_intact(target: Path, previous: Exported) -> None:
    """The previous export is byte-identical, still loads, and nothing was left beside it."""
    assert target.read_bytes() == previous.path.read_bytes()
    runtime.load(target, threads=1)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


# ---- output paths ---------------------------------------------------------------------------


def test_read_only_directory(gptkit_export, target, previous, good_checkpoint, monkeypatch):
    """`gptkit export out/model.onnx` with out/ mode 0555: one line, exit 1, nothing written."""
    locked = target.parent
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: check as a normal user would be
            real = os.access
            monkeypatch.setattr(
                os, "access", lambda p, m: False if Path(p) == locked else real(p, m)
            )
        result = gptkit_export(str(target), "--checkpoint", str(good_checkpoint))
        one_line_error(result, "cannot write to", "permission denied")
    finally:
        locked.chmod(0o755)
    assert_intact(target, previous)


def test_read_only_file_system(gptkit_export, target, previous, good_checkpoint, monkeypatch):
    """Found a defect: the directory looks writable (os.access says yes: root, NFS, a read-only
    mount) but creating the file fails with EROFS; that was an OSError traceback."""
    real = tempfile.mkstemp

    def erofs(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == target.parent:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", erofs)
    result = gptkit_export(str(target), "--checkpoint", str(good_checkpoint))
    one_line_error(result, "cannot write", "Read-only file system")
    assert_intact(target, previous)


def test_disk_full_while_writing(gptkit_export, target, previous, good_checkpoint, monkeypatch):
    """ENOSPC in the middle of writing the file: one line, the previous export intact, no temp."""
    import runtime.tokenizer

    real = runtime.tokenizer.os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.tokenizer.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    result = gptkit_export(str(target), "--checkpoint", str(good_checkpoint))
    one_line_error(result, "cannot write", "No space left on device")
    assert_intact(target, previous)


@pytest.mark.parametrize("kind", ["directory", "symlink-to-directory"])
def test_output_is_a_directory(gptkit_export, tmp_path, good_checkpoint, kind):
    out = tmp_path / "models"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    if kind == "symlink-to-directory":
        (tmp_path / "link").symlink_to(out, target_is_directory=True)
        out = tmp_path / "link"
    result = gptkit_export(str(out), "--checkpoint", str(good_checkpoint))
    one_line_error(result, "is a directory", "give a file name")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["keep.txt"]


def test_output_directory_missing(gptkit_export, tmp_path, good_checkpoint):
    result = gptkit_export(
        str(tmp_path / "no" / "model.onnx"), "--checkpoint", str(good_checkpoint)
    )
    one_line_error(result, "does not exist", "create it first")
    assert not (tmp_path / "no").exists()


# ---- options --------------------------------------------------------------------------------

OPTION_CASES = [
    ("opset-9", ["--opset", "9"], ["opset 9 is not supported", "18..20"], 1),
    ("opset-21", ["--opset", "21"], ["opset 21 is not supported"], 1),
    ("opset-negative", ["--opset", "-1"], ["opset -1 is not supported"], 1),
    ("fp16-plus-int8", ["--dtype", "fp16", "--quantize", "int8"], ["cannot be combined"], 1),
    ("dtype-fp8", ["--dtype", "fp8"], ["'fp8' is not one of"], 2),
    ("quantize-int3", ["--quantize", "int3"], ["'int3' is not"], 2),
]


@pytest.mark.parametrize(
    ("args", "needles", "code"),
    [c[1:] for c in OPTION_CASES],
    ids=[c[0] for c in OPTION_CASES],
)
def test_unsupported_options(gptkit_export, target, previous, good_checkpoint, args, needles, code):
    result = gptkit_export(str(target), "--checkpoint", str(good_checkpoint), *args)
    one_line_error(result, *needles, code=code)
    assert_intact(target, previous)


# ---- checkpoints ----------------------------------------------------------------------------


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _edit_config(ckpt: Path, **model: object) -> None:
    doc = json.loads((ckpt / "config.json").read_text())
    doc["model"].update(model)
    (ckpt / "config.json").write_text(json.dumps(doc))


CHECKPOINT_CASES = [
    # (id, damage(ckpt), needles)
    ("safetensors-truncated", lambda c: _truncate(c / "model.safetensors", 5000), ["corrupt or truncated"]),
    ("safetensors-zero-bytes", lambda c: _truncate(c / "model.safetensors", 0), ["corrupt or truncated"]),
    ("safetensors-missing", lambda c: (c / "model.safetensors").unlink(), ["model.safetensors is missing"]),
    ("config-n-layer-3", lambda c: _edit_config(c, n_layer=3), ["does not match its config", "missing"]),
    ("config-n-embd-128", lambda c: _edit_config(c, n_embd=128), ["does not match its config", "has shape"]),
    ("config-not-json", lambda c: (c / "config.json").write_text("{model"), ["config.json is not valid JSON"]),
    ("config-unknown-key", lambda c: _edit_config(c, n_experts=8), ["unknown model config key(s): n_experts"]),
    ("config-wrong-type", lambda c: _edit_config(c, n_layer="2"), ["n_layer must be an integer"]),
    ("config-n-head-3", lambda c: _edit_config(c, n_head=3), ["must be divisible by n_head"]),
    ("config-missing", lambda c: (c / "config.json").unlink(), ["config.json is missing"]),
    ("tokenizer-json-missing", lambda c: (c / "tokenizer.json").unlink(), ["tokenizer.json is missing"]),
    ("tokenizer-ranks-missing", lambda c: (c / "tokenizer.tiktoken").unlink(), ["ranks file", "not found"]),
    ("tokenizer-ranks-corrupt", lambda c: (c / "tokenizer.tiktoken").write_text("@@@ x\n"), ["corrupt tokenizer ranks"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "needles"),
    [c[1:] for c in CHECKPOINT_CASES],
    ids=[c[0] for c in CHECKPOINT_CASES],
)
def test_bad_checkpoint(gptkit_export, target, previous, checkpoint, damage, needles):
    damage(checkpoint)
    before = digest(checkpoint)
    result = gptkit_export(str(target), "--checkpoint", str(checkpoint))
    one_line_error(result, *needles)
    assert_intact(target, previous)
    assert digest(checkpoint) == before  # export never modifies what it reads


@pytest.mark.parametrize("kind", ["missing", "empty-directory", "a-file"])
def test_no_checkpoint_there(gptkit_export, target, previous, tmp_path, kind):
    path = tmp_path / "ckpt"
    if kind == "empty-directory":
        path.mkdir()
    elif kind == "a-file":
        path.write_text("not a checkpoint")
    result = gptkit_export(str(target), "--checkpoint", str(path))
    one_line_error(result, "no checkpoint at" if kind == "missing" else "holds no checkpoint")
    assert_intact(target, previous)


@pytest.mark.parametrize("kind", ["missing", "empty-directory"])
def test_bad_hugging_face_directory(gptkit_export, target, previous, tmp_path, kind):
    hf = tmp_path / "hf"
    if kind == "empty-directory":
        hf.mkdir()
    result = gptkit_export(str(target), "--hf", str(hf))
    one_line_error(result, "is not a directory" if kind == "missing" else "config.json")
    assert_intact(target, previous)


# ---- faults ---------------------------------------------------------------------------------


def test_ctrl_c_during_export_keeps_the_previous_file(
    gptkit_export, target, previous, good_checkpoint, monkeypatch
):
    """Ctrl-C while the parity check runs: exit 130, 'Interrupted.', old file intact, no temp."""
    import export.onnx_export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.onnx_export, "verify_parity", interrupted)
    result = gptkit_export(str(target), "--checkpoint", str(good_checkpoint))
    assert result.exit_code == 130 and "Interrupted." in result.stderr
    assert "Traceback" not in result.output
    assert_intact(target, previous)


def test_parity_failure_keeps_the_previous_file(
    gptkit_export, target, previous, good_checkpoint, monkeypatch
):
    import export.parity

    monkeypatch.setitem(export.parity.TOLERANCES, "fp32", 0.0)
    result = gptkit_export(str(target), "--checkpoint", str(good_checkpoint))
    one_line_error(result, "parity check failed", f"{target} not written")
    assert_intact(target, previous)


def test_a_successful_export_replaces_the_previous_file(
    gptkit_export, target, previous, good_checkpoint
):
    """The control case: the same command with nothing wrong does replace the file."""
    result = gptkit_export(str(target), "--checkpoint", str(good_checkpoint))
    assert result.exit_code == 0, result.output
    assert target.read_bytes() != previous.path.read_bytes()  # a new file (new export date)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert runtime.load(target).generate("ROMEO:", max_new_tokens=4, temperature=0) == (
        runtime.load(previous.path).generate("ROMEO:", max_new_tokens=4, temperature=0)
    )


# ---- nothing unpickles a user's file ---------------------------------------------------------


def test_no_source_file_unpickles():
    """Every torch.load passes weights_only=True; nothing calls pickle.load(s)."""
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for package in ("runtime", "gpt_core", "export", "gptkit", "examples", "benchmarks"):
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for i, line in enumerate(text.splitlines(), 1):
                code = line.split("#")[0]
                if "pickle.load" in code or "import pickle" in code:
                    offenders.append(f"{path.name}:{i}")
            for at in (i for i in range(len(text)) if text.startswith("torch.load(", i)):
                if "weights_only=True" not in text[at : at + 300]:  # the call's arguments
                    offenders.append(f"{path.name}:{text.count(chr(10), 0, at) + 1}")
    assert offenders == []
