"""The layering contract: ``runtime`` works without torch and ``--help`` stays light.

Checked in fresh subprocesses, because this test process has long since imported torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gptkit.cli

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "onnxruntime")
# runtime is the bottom layer: it may import neither the layers above it nor PyTorch.
FORBIDDEN_IN_RUNTIME = ("torch", "gpt_core", "export", "gptkit", "transformers", "tokenizers")

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test (imported as {name})")
            return None

    sys.meta_path.insert(0, BlockTorch())
    """
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_every_runtime_module_imports_without_torch() -> None:
    code = BLOCK_TORCH + textwrap.dedent(
        """
        import importlib, json, pkgutil
        import runtime

        names = ["runtime"]
        for info in pkgutil.walk_packages(runtime.__path__, "runtime."):
            importlib.import_module(info.name)
            names.append(info.name)
        upper = sorted(m for m in sys.modules if m.split(".")[0] in ("gpt_core", "export"))
        print(json.dumps({"imported": names, "upper_layers": upper}))
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert {"runtime.errors", "runtime.tokenizer"} <= set(report["imported"])
    assert report["upper_layers"] == []


def test_the_torch_blocker_works() -> None:
    """Guard against a vacuous pass: with the blocker on, importing torch must fail."""
    result = run_python(BLOCK_TORCH + "import torch\n")
    assert result.returncode != 0
    assert "torch is blocked" in result.stderr


def test_python_m_gptkit_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gptkit", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    for name in gptkit.cli.cli.commands:
        assert name in result.stdout


@pytest.mark.parametrize("command", [None, *sorted(gptkit.cli.cli.commands)])
def test_help_does_not_import_heavy_modules(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    code = textwrap.dedent(
        f"""
        import contextlib, io, json, sys
        from gptkit.cli import cli

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main({args!r}, prog_name="gptkit", standalone_mode=False)
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(json.dumps({{"code": code, "help": out.getvalue(), "heavy": heavy}}))
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == 0
    assert report["help"].startswith("Usage: gptkit")
    assert report["heavy"] == [], f"gptkit {' '.join(args)} imported {report['heavy']}"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            names.extend(
                arg.value
                for arg in node.args[:1]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            )
    return names


def test_runtime_source_never_imports_upper_layers() -> None:
    """Static: no runtime file names gpt_core, export, gptkit or torch in any import, even lazily."""
    files = sorted((ROOT / "runtime").rglob("*.py"))
    assert files
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in _imports(path)
        if name.split(".")[0] in FORBIDDEN_IN_RUNTIME
    ]
    assert offenders == []
