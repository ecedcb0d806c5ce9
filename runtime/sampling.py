"""Choosing the next token from logits, in numpy.

The processors run in this order (Hugging Face's order: penalties, then temperature, then the
truncation warpers; llama.cpp applies temperature last instead):

1. ids the tokenizer cannot decode are masked (a model vocabulary padded past the tokenizer's never yields an id that cannot be decoded),
   NaN logits count as -inf, and +inf logits share all the probability among themselves;
   ``logit_bias`` is added (OpenAI's field: -100 bans an id, +100 all but forces it);
2. repetition penalty: logits of tokens already in the row (prompt and generated) are divided by
   the penalty when positive and multiplied by it when negative (CTRL, Keskar et al. 2019);
   then OpenAI's frequency and presence penalties over the generated tokens only (as vLLM):
   ``logit - frequency_penalty * count - presence_penalty * (count > 0)``;
3. temperature: logits / temperature; temperature 0 means greedy (argmax), as in llama.cpp, and
   skips steps 4-7;
4. top-k: keep the k most likely tokens (ties with the k-th are kept);
5. top-p (nucleus): keep the smallest set of most likely tokens whose probability reaches p;
6. min-p: keep tokens whose probability is at least min_p times the most likely one's;
7. sample from what is left by inverse CDF with one uniform draw from the seeded generator.

Whatever the logits (NaN, +-inf) and whatever valid settings, the chosen id is in [0, n_vocab)
and is never one that a step above removed (tests/test_sampling.py checks this with hypothesis).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from runtime.errors import ConfigError

DEFAULT_MAX_NEW_TOKENS = 200
# Past the context: "error" refuses the request, "truncate" keeps the most recent tokens
# (runtime.generation explains how).
CONTEXT_MODES = ("error", "truncate")


@dataclass(frozen=True)
class SamplingConfig:
    """How to generate; shared by the CLI and the API so both have the same defaults."""

    # None: up to DEFAULT_MAX_NEW_TOKENS, or what fits in the context. An explicit number must fit
    # with the prompt (unless truncating): asking for more than fits is an error with the numbers.
    max_new_tokens: int | None = None
    temperature: float = 0.8  # llama.cpp's default; 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None  # None = fresh randomness; an int makes the output reproducible
    stop: tuple[str, ...] = ()  # stop when any of these strings appears (it is not returned)
    stop_at_eot: bool = True  # stop at <|endoftext|>
    presence_penalty: float = 0.0  # OpenAI's: -2..2, subtracted once from every generated id
    frequency_penalty: float = 0.0  # OpenAI's: -2..2, subtracted per occurrence of a generated id
    # OpenAI's logit_bias as (token id, bias) pairs, bias in [-100, 100]; a dict is accepted.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, (tuple, list, set, frozenset)):
            raise ConfigError(f"stop must be a string or a list of strings, got {stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.max_new_tokens is not None:
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
        if not isinstance(self.stop_at_eot, bool):
            raise ConfigError(f"stop_at_eot must be True or False, got {self.stop_at_eot!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                raise ConfigError(f"{name} must be in [-2, 2], got {value}")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    @property
    def penalises_generated(self) -> bool:
        """Whether choosing a token needs the row's generated ids (OpenAI's two penalties)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no processor that could change the argmax: the fast path."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and not self.penalises_generated
            and not self.logit_bias
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingOptions(TypedDict, total=False):
    """:class:`SamplingConfig`'s fields as keyword arguments, e.g. ``model.generate(p, **options)``.

    Every key is optional; values are checked by ``SamplingConfig``. ``stop`` takes what the
    constructor accepts: one string, or a list, tuple or set of them. tests/test_sampling.py keeps
    the keys and types in step with the dataclass.
    """

    max_new_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int | None
    stop: str | list[str] | tuple[str, ...] | set[str] | frozenset[str] | None
    stop_at_eot: bool
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[int, float] | tuple[tuple[int, float], ...]


def process_logits(
    logits: np.ndarray,
    config: SamplingConfig,
    *,
    n_vocab: int,
    context: Sequence[int] = (),
    generated: Sequence[int] = (),
) -> np.ndarray:
    """Steps 1-6 above on one row of logits; returns float64 scores with -inf for removed ids.

    ``context`` is the row so far (prompt and generated ids), ``generated`` its generated part.
    """
    scores = np.array(logits, dtype=np.float64).reshape(-1)
    scores[n_vocab:] = -np.inf
    scores[np.isnan(scores)] = -np.inf
    for token, bias in config.logit_bias:
        if token < n_vocab:
            scores[token] += bias
    if config.repetition_penalty != 1.0 and len(context):
        seen = np.unique(np.asarray(context, dtype=np.int64))
        seen = seen[(seen >= 0) & (seen < n_vocab)]
        values = scores[seen]
        scores[seen] = np.where(
            values > 0, values / config.repetition_penalty, values * config.repetition_penalty
        )
    if config.penalises_generated and len(generated):
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        keep = (ids >= 0) & (ids < n_vocab)
        ids, counts = ids[keep], counts[keep]
        scores[ids] -= config.frequency_penalty * counts + config.presence_penalty
    if config.greedy:
        return _collapse_posinf(scores)
    with np.errstate(over="ignore"):  # a tiny temperature may overflow to inf: handled next
        scores = _collapse_posinf(scores / config.temperature)
    if config.top_k and config.top_k < n_vocab:
        kth = np.partition(scores, -config.top_k)[-config.top_k]
        scores[scores < kth] = -np.inf  # ties with the k-th score are kept
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


def _collapse_posinf(scores: np.ndarray) -> np.ndarray:
    """Infinitely likely ids share all the probability: 0 for them, -inf for every other id."""
    if np.isposinf(scores).any():
        return np.where(np.isposinf(scores), 0.0, -np.inf)
    return scores


def choose_token(
    logits: np.ndarray,
    config: SamplingConfig,
    rng: np.random.Generator,
    *,
    n_vocab: int,
    context: Sequence[int] = (),
    generated: Sequence[int] = (),
    argmax: int | None = None,
) -> int:
    """The next token id: always in [0, n_vocab), even for logits that are all -inf or NaN.

    Draws exactly one uniform number per sampled token (none when greedy), so a seeded generator
    gives the same tokens whatever else runs in the process. ``argmax``: the argmax of the valid
    logits when the caller already found it finite (the loop does a whole batch in one call).
    """
    if config.plain_greedy:
        if argmax is not None:
            return argmax
        valid = np.asarray(logits).reshape(-1)[:n_vocab]
        token = int(np.argmax(valid))  # NB: argmax returns the first NaN if there is one
        if valid.size and np.isfinite(valid[token]):  # so: no NaN, no +inf; nothing to process
            return token
    scores = process_logits(logits, config, n_vocab=n_vocab, context=context, generated=generated)
    if not np.isfinite(scores).any():
        # Nothing survived (every valid logit -inf or NaN): the best raw valid id, else 0.
        raw = np.asarray(logits, dtype=np.float64).reshape(-1)[:n_vocab]
        raw = np.where(np.isnan(raw), -np.inf, raw)
        return int(np.argmax(raw)) if raw.size else 0
    if config.greedy:
        return int(np.argmax(scores))
    cumulative = np.cumsum(softmax(scores))
    # Inverse-CDF sampling: the first id whose cumulative probability exceeds u. An id with
    # probability 0 never has a cumulative value above its predecessor's, so it is never chosen.
    token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    if token >= cumulative.size:  # u * total rounded up to total: take the last possible id
        token = int(np.flatnonzero(np.isfinite(scores))[-1])
    return token


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64); -inf stays -inf."""
    x = np.asarray(logits, dtype=np.float64)
    peak = np.max(x, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    shifted = x - peak
    with np.errstate(divide="ignore", invalid="ignore"):
        out = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    return np.where(np.isneginf(x), -np.inf, out)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Probabilities of one row of scores; all zeros when every score is -inf."""
    peak = np.max(scores)
    if math.isinf(peak):
        hits = (scores == peak) if peak > 0 else np.zeros(scores.shape, dtype=bool)
        return hits / max(1, int(hits.sum()))
    exp = np.exp(scores - peak)
    probs: np.ndarray = exp / exp.sum()  # numpy types this division as Any
    return probs


def _bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (id, bias) pairs, from pairs or a {id: bias} mapping."""
    items = value.items() if isinstance(value, dict) else value
    if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
        raise ConfigError(f"logit_bias must map token ids to biases, got {value!r}")
    pairs: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ConfigError(f"logit_bias must map token ids to biases, got {value!r}")
        token, bias = item
        _check_int("a logit_bias token id", token, minimum=0)
        _check_number("a logit_bias value", bias)
        if not -100 <= bias <= 100:
            raise ConfigError(f"logit_bias values must be in [-100, 100], got {bias}")
        pairs[int(token)] = float(bias)
    return tuple(sorted(pairs.items()))


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating))
        or (not isinstance(value, int) and math.isnan(value))
    ):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        infinite = math.isinf(value)
    except OverflowError:  # an int too large for a float
        raise ConfigError(f"{name} must be finite, got an integer too large for a float") from None
    if infinite:
        raise ConfigError(f"{name} must be finite, got {value}")
