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
from hypothesis import strategies as st

from runtime.onnx_contract import ATTENTION_MASK, INPUT_IDS, PAST_PREFIX, POSITION_IDS, past_for
from runtime.tokenizer import ENDOFTEXT

# Text that stresses a tokenizer: any valid UTF-8 (lone surrogates are not), emoji, CJK, runs of
# whitespace, a contraction and the end-of-text marker as plain text.
TOKENIZER_TEXT = st.lists(
    st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",))),
        st.sampled_from(["😀", "世界", " the", "\n\n", "  ", "'ll", ENDOFTEXT]),
    ),
    max_size=10,
).map("".join)

ENV_MODEL = "GPTKIT_TEST_MODEL"
TORCH_SEED = 1234


@dataclass
class Exported:
    path: Path
    torch_model: Any = (
        None  # the gpt_core GPT the file was exported from (None for a prebuilt file)
    )


def export_tiny(directory: Path, *, dtype: str = "fp32", kv_cache: str = "concat") -> Exported:
    """Export a seeded ``tiny`` GPT with a 512-id BPE trained on a little Shakespeare."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import gzip

    from export import ExportOptions, export_onnx
    from gpt_core.bpe import train_bpe
    from gpt_core.config import GPTConfig
    from gpt_core.model import GPT

    corpus = Path(__file__).resolve().parent.parent / "gpt_core" / "data" / "tinyshakespeare.txt.gz"
    text = gzip.decompress(corpus.read_bytes()).decode("utf-8")[:16_000]
    tokenizer = train_bpe([text], 512, name="test-bpe")
    torch.manual_seed(TORCH_SEED)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tokenizer.n_vocab)).eval()
    path = directory / f"tiny-{dtype}-{kv_cache}.onnx"
    export_onnx(model, tokenizer, path, options=ExportOptions(dtype=dtype, kv_cache=kv_cache))
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


# A plain onnxruntime loop, independent of runtime.session: the tests' second opinion on a graph.


def ort_session(path: str | os.PathLike[str]) -> Any:
    """A CPU InferenceSession with ORT's default optimisations and errors-only logging."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def empty_past(session: Any, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors for the prompt step: (batch, n_head, 0, head_dim)."""
    past = [i for i in session.get_inputs() if i.name.startswith(PAST_PREFIX)]
    dtype = np.float16 if "float16" in past[0].type else np.float32
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=dtype) for i in past}


def ort_step(
    session: Any,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    position_ids: np.ndarray,
    past: dict[str, np.ndarray],
) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    """One forward: (logits, presents in output order, the past for the next step)."""
    feed = {
        INPUT_IDS: input_ids.astype(np.int64),
        ATTENTION_MASK: attention_mask.astype(np.int64),
        POSITION_IDS: position_ids.astype(np.int64),
        **past,
    }
    names = [o.name for o in session.get_outputs()]
    logits, *presents = session.run(None, feed)
    next_past = {past_for(n): v for n, v in zip(names[1:], presents, strict=True)}
    return logits, presents, next_past


def ort_greedy(session: Any, prompt: list[int], n_tokens: int) -> list[int]:
    """``n_tokens`` greedy ids after ``prompt`` with the graph's own cache fed back (batch 1)."""
    ids = np.array([prompt], dtype=np.int64)
    past = empty_past(session, 1)
    length, produced = len(prompt), []
    for _ in range(n_tokens):
        positions = np.arange(length - ids.shape[1], length, dtype=np.int64)[None]
        logits, _, past = ort_step(session, ids, np.ones((1, length), np.int64), positions, past)
        token = int(logits[0, -1].argmax())
        produced.append(token)
        ids = np.array([[token]], dtype=np.int64)
        length += 1
    return produced
