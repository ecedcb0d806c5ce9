"""The ``>>>`` examples in the runtime's docstrings run, against a real exported model.

Each module's examples run with ``doctest`` in a directory holding the model as ``model.onnx`` (so
``runtime.load("model.onnx")`` finds it), with ``model`` already loaded for the method examples,
and with ELLIPSIS on. Torch-free: CI's runtime-only venv runs this file against its prebuilt model.
"""

from __future__ import annotations

import doctest
import shutil
from pathlib import Path
from types import ModuleType

import pytest
from runtime_helpers import Exported, prebuilt_or_tiny

import runtime
import runtime.model
import runtime.tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return prebuilt_or_tiny(tmp_path_factory)


@pytest.mark.parametrize(
    ("module", "at_least"),  # at_least: how many examples the module shows (none may go missing)
    [
        pytest.param(m, n, id=m.__name__)
        for m, n in [(runtime, 7), (runtime.model, 16), (runtime.tokenizer, 2)]
    ],
)
def test_docstring_examples_run(
    module: ModuleType,
    at_least: int,
    exported: Exported,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shutil.copyfile(exported.path, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    model = runtime.load("model.onnx", threads=1)
    failed, attempted = doctest.testmod(
        module, extraglobs={"model": model}, optionflags=doctest.ELLIPSIS, report=False
    )
    report = capsys.readouterr().out  # doctest prints each failing example, with what it got
    assert failed == 0, report
    assert attempted >= at_least, f"only {attempted} examples ran in {module.__name__}"
