"""The benchmarks' workload: threads, prompt, shapes, and the weight bytes one decode step reads.

Every module of the decode benchmark imports this one first: it pins the BLAS/OpenMP thread
pools before numpy is imported. Nothing here imports torch: the gptkit-runtime and
onnxruntime-genai workers import this file too and must stay torch-free, so their start-up time
and peak RSS are their own.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THREADS = 2  # intra-op threads for every system (the project machine has 2 cores)

# Every BLAS/OpenMP pool gets THREADS threads; OpenBLAS reads this when numpy is first imported.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ.setdefault(_var, str(THREADS))

import numpy as np  # noqa: E402

PROMPT_LEN = 32
NEW_TOKENS = 128
WEIGHT_SEED = 0  # torch.manual_seed before building the model
PROMPT_SEED = 1234  # numpy.random.default_rng seed for the prompt ids
# tiny (64) and small-cpu (128) have contexts shorter than the 32 + 128 tokens of the workload; the
# benchmark builds them with this block size instead (only the position table grows).
MIN_BLOCK_SIZE = 256
PROBE_NEW_TOKENS = 9  # a latency probe generates this many tokens and times steps 2..9
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "gptkit-bench"  # weights and exports, reused


def bench_config(shape: str) -> dict[str, Any]:
    """The GPTConfig (as a dict) a shape is benchmarked with: the preset, block_size >= 256."""
    from gpt_core.config import GPTConfig  # torch-free module

    cfg = GPTConfig.preset(shape)
    if cfg.block_size < MIN_BLOCK_SIZE:
        cfg = cfg.replace(block_size=MIN_BLOCK_SIZE)
    return cfg.replace(dropout=0.0).to_dict()


def prompt_ids(batch: int, vocab_size: int) -> np.ndarray:
    """The same (batch, 32) int64 prompt for every system: row i is the same for every batch size."""
    rng = np.random.default_rng(PROMPT_SEED)
    return rng.integers(0, min(vocab_size, 50256), size=(batch, PROMPT_LEN), dtype=np.int64)


def probe_positions(block_size: int, new_tokens: int) -> list[int]:
    """Prompt lengths at which decode steps are timed: ~16, ~256 and near block_size.

    A probe generates ``new_tokens`` after the prompt, so the last one ends just inside the context.
    """
    positions = [16]
    if 256 < block_size - 64:
        positions.append(256)
    positions.append(block_size - new_tokens - 3)
    return positions


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def runtime_tokens(model, rows: list[list[int]], new_tokens: int) -> Iterator[tuple[int, int]]:
    """Greedy (row, token) pairs from a gptkit ``runtime.Model``, for token-id prompts.

    ``Model.generate_tokens`` is the token-level loop under ``Model.generate`` (which takes text;
    the benchmark feeds random ids): the same prefill, cache steps and token choice.
    """
    stream = model.generate_tokens(
        rows, max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False
    )
    for token in stream:
        yield token.row, token.id


# ---- the physical floor -------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of weights one decode step must stream from memory (each read once per step)."""

    matmul_params: int  # the 4 linear layers of every block plus the output head (= wte)
    other_params: int  # biases and LayerNorms (embedding lookups read one row: not counted)

    def per_token(self, precision: str) -> int:
        matmul_bytes = 1 if precision == "int8" else 4  # int8 files quantise exactly the MatMuls
        return self.matmul_params * matmul_bytes + self.other_params * 4


def weight_bytes(config: dict[str, Any]) -> WeightBytes:
    c, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    per_layer_matmul = 12 * c * c  # c_attn 3C², attn c_proj C², c_fc 4C², mlp c_proj 4C²
    per_layer_other = (3 * c + c + 4 * c + c) + 4 * c  # biases, then ln_1 and ln_2
    return WeightBytes(
        matmul_params=layers * per_layer_matmul + vocab * c,
        other_params=layers * per_layer_other + 2 * c,  # + ln_f
    )
