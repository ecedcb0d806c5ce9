"""Long prompts are prefilled in chunks: same tokens and scores as one pass, bounded memory.

The chunk size is patched down to a few tokens so the tiny model's prompts span several chunks.
Runs torch-free against the prebuilt model in CI; the in-place cases need torch to export.
"""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import Exported, prebuilt_or_tiny

import runtime.generation
from runtime.model import Model, load
from runtime.session import OnnxSession

PROMPTS = ["ROMEO: Is the day so young?", "JULIET: Ay me!", "To be, or not to be, that is"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return prebuilt_or_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def model(exported: Exported) -> Model:
    return load(exported.path, threads=1)


@pytest.fixture
def count_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The token count of every session.run call (chunks show up as several)."""
    calls: list[int] = []
    real = OnnxSession.run

    def counting(self, input_ids, *args, **kwargs):
        calls.append(np.asarray(input_ids).shape[1])
        return real(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(OnnxSession, "run", counting)
    return calls


def generate(model: Model, prompts, chunk: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(runtime.generation, "PREFILL_CHUNK", chunk)
    return model.generate(list(prompts), max_new_tokens=8, temperature=0)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3"])
def test_chunked_prefill_gives_the_one_pass_tokens(model, prompts, monkeypatch, count_runs):
    one_pass = generate(model, prompts, 10_000, monkeypatch)
    width = max(len(model.tokenizer.encode(p)) for p in prompts)
    count_runs.clear()
    chunked = generate(model, prompts, 3, monkeypatch)
    assert chunked == one_pass
    assert count_runs[: -(8 - 1)] == [3] * (width // 3) + ([width % 3] if width % 3 else [])


def test_chunked_score_matches_one_pass(model, monkeypatch):
    text = "ROMEO: But soft, what light through yonder window breaks?"
    monkeypatch.setattr(runtime.generation, "PREFILL_CHUNK", 10_000)
    whole = model.score(text)
    monkeypatch.setattr(runtime.generation, "PREFILL_CHUNK", 4)
    chunked = model.score(text)
    assert chunked.token_ids == whole.token_ids
    assert len(chunked.logprobs) == len(whole.logprobs) == len(whole.token_ids)
    np.testing.assert_allclose(chunked.logprobs, whole.logprobs, atol=1e-4)


@pytest.fixture(scope="module")
def inplace_model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    from runtime_helpers import export_tiny

    from export import ExportOptions, export_onnx

    base = export_tiny(tmp_path_factory.mktemp("chunks"))
    path = base.path.with_name("inplace.onnx")
    tokenizer = load(base.path).tokenizer
    export_onnx(base.torch_model, tokenizer, path, options=ExportOptions(kv_cache="inplace"))
    return load(path, threads=1)


@pytest.mark.torch
def test_inplace_single_row_is_chunked_and_a_batch_is_not(inplace_model, monkeypatch, count_runs):
    one_pass = generate(inplace_model, PROMPTS[:1], 10_000, monkeypatch)
    count_runs.clear()
    assert generate(inplace_model, PROMPTS[:1], 3, monkeypatch) == one_pass
    assert count_runs[0] == 3 and len(count_runs) > 8  # several prefill chunks, then 7 steps
    count_runs.clear()
    batch = generate(inplace_model, PROMPTS, 3, monkeypatch)
    # GroupQueryAttention refuses several tokens on a non-empty past for batch > 1: one pass
    assert len(count_runs) == 8 and count_runs[0] > 3
    assert batch == generate(inplace_model, PROMPTS, 10_000, monkeypatch)
