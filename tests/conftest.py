"""Shared fixtures: a tiny seeded model, a small trained tokenizer, a click runner.

Everything is small (2 layers, 64 wide, a 16 KB corpus) so the whole suite runs on two CPU cores.
PyTorch is imported inside the fixtures that need it, so torch-free tests can share this file.
Hypothesis example counts come from ``GPTKIT_HYPOTHESIS_EXAMPLES`` (default 50).
"""

from __future__ import annotations

import gzip
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


@pytest.fixture
def runner() -> CliRunner:
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
