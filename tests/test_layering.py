"""The layering contract: ``runtime`` works without torch and ``--help`` stays light.

Checked in fresh subprocesses, because this test process has long since imported torch.
"""

from __future__ import annotations

import ast
import importlib
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


PACKAGES = ("runtime", "gpt_core", "export", "gptkit")
# Arrows point one way: gptkit -> export -> gpt_core -> runtime. Each layer may import only
# itself and the layers after it in this tuple.
LAYERS = ("gptkit", "export", "gpt_core", "runtime")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _run_time_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports when it runs (anywhere in the file, lazily too),
    leaving out ``if TYPE_CHECKING:`` blocks, which never run."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports the submodule pkg.mod when there is one
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            if name in modules:
                found.add(name)
                if isinstance(node, ast.ImportFrom) and name != node.module:
                    break  # the submodule, not its package, is what this import needs
    return found


def _import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    modules = {_module_name(p) for p in files}
    graph = {}
    for path in files:
        name = _module_name(path)
        graph[name] = _run_time_imports(path, modules) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_among_the_project_modules() -> None:
    """Read from the source, lazy imports inside functions included."""
    graph = _import_graph()
    assert graph["export.onnx_export"] >= {"export.variants", "export.graph_edits"}  # not vacuous
    assert _cycles(graph) == []


def test_the_cycle_check_finds_cycles_through_lazy_imports(tmp_path: Path) -> None:
    """Guard against a vacuous pass: a module importing another inside a function, which
    imports it back, is a cycle; an import under TYPE_CHECKING is not."""
    (tmp_path / "a.py").write_text("def f():\n    from b import g\n")
    (tmp_path / "b.py").write_text("import a\n")
    (tmp_path / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
    )
    modules = {"a", "b", "c"}
    graph = {m: _run_time_imports(tmp_path / f"{m}.py", modules) - {m} for m in modules}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_layers_import_only_downwards() -> None:
    graph = _import_graph()
    offenders = []
    for module, targets in graph.items():
        layer = LAYERS.index(module.split(".")[0])
        for target in targets:
            if LAYERS.index(target.split(".")[0]) < layer:
                offenders.append(f"{module} -> {target}")
    assert offenders == []


@pytest.mark.parametrize(
    "package",
    [
        "runtime",
        pytest.param("gpt_core", marks=pytest.mark.torch),
        pytest.param("export", marks=pytest.mark.torch),
    ],
)
def test_every_public_name_resolves(package: str) -> None:
    """The names the README uses (`gpt_core.GPT`, `export.export_onnx`, ...) are really there."""
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert module.__all__ and missing == []


def test_option_modules_import_without_torch() -> None:
    """What the CLI's --help reads: the options of every layer, with torch blocked."""
    code = BLOCK_TORCH + textwrap.dedent(
        """
        import gpt_core.config, gpt_core.train_config, export.options, runtime.sampling
        from gpt_core import GPTConfig, TrainConfig
        from export import ExportOptions
        ExportOptions().validate(); TrainConfig().validate()
        print("ok")
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
