"""Choosing the next token from logits, in numpy.

The processors run in this order (Hugging Face's order, with repetition penalty first):

1. ids the tokenizer cannot decode are masked (a padded vocabulary never leaks out);
2. repetition penalty: logits of tokens already in the context are divided by the penalty when
   positive and multiplied when negative (CTRL, Keskar et al. 2019);
3. temperature: logits / temperature; temperature 0 means greedy (argmax), as in llama.cpp;
4. top-k: keep the k most likely tokens;
5. top-p (nucleus): keep the smallest set whose probability reaches p;
6. min-p: keep tokens whose probability is at least min_p times the most likely one's;
7. sample from what is left with the seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How to generate; shared by the CLI and the API so both have the same defaults."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None  # None = fresh randomness; an int makes the output reproducible
    stop: tuple[str, ...] = ()  # stop when any of these strings appears (it is not returned)
    stop_at_eot: bool = True  # stop at <|endoftext|>

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(
    logits: np.ndarray,
    config: SamplingConfig,
    *,
    n_vocab: int,
    context: Sequence[int] = (),
) -> np.ndarray:
    """Steps 1-6 above on one row of logits; returns float64 logits with -inf for removed ids."""
    scores = np.array(logits, dtype=np.float64).reshape(-1)
    scores[n_vocab:] = -np.inf
    scores[np.isnan(scores)] = -np.inf
    if np.isposinf(scores).any():  # infinitely likely tokens: a uniform choice among them
        scores = np.where(np.isposinf(scores), 0.0, -np.inf)
    if config.repetition_penalty != 1.0 and len(context):
        seen = np.unique(np.asarray(context, dtype=np.int64))
        seen = seen[seen < n_vocab]
        values = scores[seen]
        scores[seen] = np.where(
            values > 0, values / config.repetition_penalty, values * config.repetition_penalty
        )
    if config.greedy:
        return scores
    scores = scores / config.temperature
    if config.top_k and config.top_k < n_vocab:
        kth = np.partition(scores, -config.top_k)[-config.top_k]
        scores[scores < kth] = -np.inf
    if config.top_p < 1.0 or config.min_p > 0.0:
        probs = softmax(scores)
        if config.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep every token up to and including the one that crosses p
            cutoff = int(np.searchsorted(cumulative, config.top_p, side="left")) + 1
            removed = order[cutoff:]
            scores[removed] = -np.inf
            probs[removed] = 0.0
        if config.min_p > 0.0:
            scores[probs < config.min_p * probs.max()] = -np.inf
    return scores


def choose_token(
    logits: np.ndarray,
    config: SamplingConfig,
    rng: np.random.Generator,
    *,
    n_vocab: int,
    context: Sequence[int] = (),
) -> int:
    """The next token id: always in [0, n_vocab), even for logits that are all -inf or NaN."""
    scores = process_logits(logits, config, n_vocab=n_vocab, context=context)
    if not np.isfinite(scores).any():
        # Nothing survived (all -inf/NaN logits): fall back to the raw argmax over valid ids.
        raw = np.nan_to_num(np.asarray(logits, dtype=np.float64).reshape(-1)[:n_vocab], nan=-np.inf)
        return int(np.argmax(raw)) if raw.size else 0
    if config.greedy:
        return int(np.argmax(scores))
    probs = softmax(scores)
    return int(rng.choice(probs.size, p=probs))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64)."""
    x = np.asarray(logits, dtype=np.float64)
    peak = np.max(x, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    shifted = x - peak
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def softmax(scores: np.ndarray) -> np.ndarray:
    peak = np.max(scores)
    exp = np.exp(scores - (peak if math.isfinite(peak) else 0.0))
    return exp / exp.sum()


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating))
        or math.isnan(value)
    ):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if math.isinf(value):
        raise ConfigError(f"{name} must be finite, got {value}")
