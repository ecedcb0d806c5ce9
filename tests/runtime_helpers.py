"""Models for the runtime tests: a prebuilt export named by ``GPTKIT_TEST_MODEL``, or one built here.

CI runs the runtime tests in a clean virtual environment without PyTorch, against a model exported
earlier in the same run (``GPTKIT_TEST_MODEL=path/to/model.onnx``). Elsewhere the fixtures export
the ``tiny`` preset (2 layers, 64 wide, 64 positions) with a small trained BPE, which takes well
under a second; without either, the model tests skip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ENV_MODEL = "GPTKIT_TEST_MODEL"
TORCH_SEED = 1234


@dataclass
class Exported:
    path: Path
    torch_model: Any = (
        None  # the gpt_core GPT the file was exported from (None for a prebuilt file)
    )


def export_tiny(directory: Path, *, dtype: str = "fp32") -> Exported:
    """Export a seeded ``tiny`` GPT with a 512-id BPE trained on a little Shakespeare."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import gzip

    from export.onnx_export import ExportOptions, export_onnx
    from gpt_core.bpe import train_bpe
    from gpt_core.config import GPTConfig
    from gpt_core.model import GPT

    corpus = Path(__file__).resolve().parent.parent / "gpt_core" / "data" / "tinyshakespeare.txt.gz"
    text = gzip.decompress(corpus.read_bytes()).decode("utf-8")[:16_000]
    tokenizer = train_bpe([text], 512, name="test-bpe")
    torch.manual_seed(TORCH_SEED)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tokenizer.n_vocab)).eval()
    path = directory / f"tiny-{dtype}.onnx"
    export_onnx(model, tokenizer, path, options=ExportOptions(dtype=dtype))
    return Exported(path=path, torch_model=model)


def prebuilt_or_tiny(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The model the suite runs against: $GPTKIT_TEST_MODEL if set, else a fresh tiny export."""
    prebuilt = os.environ.get(ENV_MODEL)
    if prebuilt:
        path = Path(prebuilt)
        if not path.is_file():
            pytest.fail(f"{ENV_MODEL}={prebuilt} is not a file")
        return Exported(path=path)
    if os.environ.get("GPTKIT_REQUIRE_MODEL"):
        pytest.fail(f"GPTKIT_REQUIRE_MODEL is set but {ENV_MODEL} is not")
    return export_tiny(tmp_path_factory.mktemp("model"))


def left_padded_mask(batch: int, total: int, padded: bool) -> np.ndarray:
    """Row r gets r + 1 leading zeros (when padded), capped so each row keeps one real token."""
    mask = np.ones((batch, total), dtype=np.int64)
    if padded:
        for row in range(batch):
            mask[row, : min(row + 1, total - 1)] = 0
    return mask


def positions_for(mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last ``seq`` tokens under ``mask``: real tokens counted from 0."""
    return (np.cumsum(mask, axis=-1) - 1).clip(min=0)[:, -seq:]
