"""Shared fixtures (a tiny seeded model, a small trained tokenizer, a click runner) and markers.

Everything is small (2 layers, 64 wide, a 16 KB corpus) so the whole suite runs on two CPU cores.
PyTorch is imported inside the fixtures that need it, so torch-free tests can share this file.
Hypothesis example counts come from ``GPTKIT_HYPOTHESIS_EXAMPLES`` (default 50).

The ``torch`` marker is decided here, once, so test modules import what they test at the top
(no ``importorskip``):

- a test module whose top-level imports name a package of the ``train`` extra (``TRAIN_EXTRA``)
  or a layer built on them (``gpt_core``, ``export``) has all its tests marked ``torch``, as has
  any test using a fixture in ``TORCH_FIXTURES``; a test may also be marked by hand;
- without the ``train`` extra (CI's torch-free venv has ``pip install .`` only) such a module is
  reported skipped without being imported, and the other ``torch`` tests are skipped;
- a module importing another optional package (``OTHER_OPTIONAL``) is skipped without it too.

``slow`` (set by hand) marks the few tests over a few seconds: ``pytest -m "not slow"`` is the
quick loop.
"""

from __future__ import annotations

import ast
import functools
import gzip
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from click.testing import CliRunner

    from gpt_core.config import GPTConfig
    from gpt_core.model import GPT
    from runtime.tokenizer import Tokenizer

settings.register_profile(
    "gptkit",
    max_examples=int(os.environ.get("GPTKIT_HYPOTHESIS_EXAMPLES", "50")),
    deadline=None,  # shared 2-core machines make per-example timing meaningless
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("gptkit")

# What `pip install .` lacks: the train extra's packages that tests import, the layers built on
# them, other extras' packages, and the shared fixtures below that need the train extra.
TRAIN_EXTRA = ("torch", "onnx", "safetensors", "tokenizers")
TORCH_LAYERS = ("gpt_core", "export")
OTHER_OPTIONAL = ("transformers",)  # the dev and bench extras
TORCH_FIXTURES = frozenset({"bpe_tokenizer", "tiny_model"})


def _missing(names: tuple[str, ...] | list[str]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


TRAIN_MISSING = _missing(TRAIN_EXTRA)


@functools.cache
def _module_needs(path: Path) -> tuple[bool, tuple[str, ...]]:
    """(needs the train extra, the packages it needs that are missing), from the module's imports.

    Only top-level ``import``/``from ... import`` statements count: an import inside a function
    or fixture is that test's business.
    """
    tree = ast.parse(path.read_bytes(), filename=str(path))
    roots = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    needs_train = bool(roots & {*TRAIN_EXTRA, *TORCH_LAYERS})
    missing = (TRAIN_MISSING if needs_train else []) + _missing(sorted(roots & {*OTHER_OPTIONAL}))
    return needs_train, tuple(missing)


def _why_skipped(missing: list[str] | tuple[str, ...]) -> str:
    extra = "train" if set(missing) & set(TRAIN_EXTRA) else "dev"
    return f"{', '.join(missing)} not installed (pip install 'gptkit[{extra}]')"


def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport | None:
    """A test module that needs a missing package is reported skipped, and never imported."""
    if isinstance(collector, pytest.Module):
        missing = _module_needs(collector.path)[1]
        if missing:
            reason = f"Skipped: {_why_skipped(missing)}"
            return pytest.CollectReport(
                collector.nodeid, "skipped", (str(collector.path), None, reason), []
            )
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=_why_skipped(TRAIN_MISSING)) if TRAIN_MISSING else None
    for item in items:
        if _module_needs(item.path)[0] or TORCH_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.torch)
        if skip and item.get_closest_marker("torch"):
            item.add_marker(skip)


SEED = 1234
CORPUS = Path(__file__).resolve().parent.parent / "gpt_core" / "data" / "tinyshakespeare.txt.gz"
CORPUS_BYTES = 16_000  # a few KB of Tiny Shakespeare: enough for a 512-id BPE, trained in ~0.1 s


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The bundled Tiny Shakespeare corpus (about 1 MB of text), read without importing torch."""
    return gzip.decompress(CORPUS.read_bytes()).decode("utf-8")


@pytest.fixture(scope="session")
def bpe_tokenizer(shakespeare: str) -> Tokenizer:
    """A byte-level BPE with at most 512 ids, trained on the first 16 KB of Shakespeare."""
    from gpt_core.bpe import train_bpe

    return train_bpe([shakespeare[:CORPUS_BYTES]], 512, name="test-bpe")


@pytest.fixture
def tiny_config() -> GPTConfig:
    """The ``tiny`` preset: 2 layers, 2 heads, 64 wide, 512 ids, 64 positions."""
    from gpt_core.config import GPTConfig

    return GPTConfig.preset("tiny")


@pytest.fixture
def tiny_model(tiny_config: GPTConfig) -> GPT:
    """A freshly initialised, seeded GPT of ``tiny_config`` in eval mode (new per test)."""
    import torch

    from gpt_core.model import GPT

    torch.manual_seed(SEED)
    return GPT(tiny_config).eval()


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    """One click CliRunner for the suite: each ``invoke`` runs in its own isolation."""
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Token cache and working directory in tmp_path: nothing lands in the repo or in ~.

    Test modules that train or tokenize opt in with
    ``pytestmark = pytest.mark.usefixtures("isolated_dirs")``.
    """
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def corpus(tmp_path: Path, shakespeare: str) -> Path:
    """20 KB of Tiny Shakespeare as a text file: enough for a tiny model's corpus."""
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare[:20_000], encoding="utf-8")
    return path
