"""The figures one decode-benchmark run collected, looked up, and the cells the report prints."""

from __future__ import annotations

import _common as common
from _systems import GPTKIT_VARIANTS, SAME_FILE_GENAI

BUSY_WARN = 0.25  # cores used by other processes during a system's run above which it is flagged


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def load_mark(result: dict) -> str:
    other = result.get("other_cpu_cores")
    if other is None:
        return "–"
    return f"{other:.2f}" + (" ⚠" if other > BUSY_WARN else "")


def agreement(result: dict, reference: dict | None) -> str:
    """Leading greedy tokens equal to the reference's (the worst row), e.g. '128/128'."""
    if reference is None or "tokens" not in result or "tokens" not in reference:
        return "–"
    worst = common.NEW_TOKENS
    for mine, theirs in zip(result["tokens"], reference["tokens"], strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), len(mine)
        )
        worst = min(worst, same)
    return f"{worst}/{common.NEW_TOKENS}"


def _fastest(results: dict[str, dict]) -> str | None:
    """The system with the highest decode tok/s (the first of equals); None when there is none."""
    if not results:
        return None
    return max(results, key=lambda system: results[system]["decode_tok_s"])


class Results:
    """The dict ``_orchestrator.run_benchmark`` returns, with the lookups the report needs."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.read_gbs = data["bandwidth"]["sum_2t"]

    def get(self, shape: str, batch: int, system: str) -> dict | None:
        for r in self.data["shapes"][shape]["results"]:
            if r["batch"] == batch and r["system"] == system and "error" not in r:
                return r
        return None

    def floor(self, shape: str, batch: int, precision: str) -> float:
        config = self.data["shapes"][shape]["manifest"]["config"]
        per_token = common.weight_bytes(config).per_token(precision)
        return batch * self.read_gbs * 1e9 / per_token

    def has(self, shape: str) -> bool:
        return shape in self.data["shapes"]

    def best(self, shape: str, batch: int, precision: str) -> str | None:
        """gptkit's faster variant (decode tok/s) at this shape, batch and precision."""
        if not self.has(shape):
            return None
        found = {s: r for s in GPTKIT_VARIANTS[precision] if (r := self.get(shape, batch, s))}
        return _fastest(found)

    def faster_genai(self, shape: str, batch: int, precision: str) -> str | None:
        """onnxruntime-genai's faster file at this shape, batch and precision."""
        files = [SAME_FILE_GENAI[s] for s in GPTKIT_VARIANTS[precision]]
        return _fastest({s: r for s in files if (r := self.get(shape, batch, s))})
