"""The embedding API: load an exported model and generate, stream or score text.

>>> import runtime
>>> model = runtime.load("model.onnx")
>>> model
Model(model.onnx: ... layers, ... wide, context ..., vocab ..., cpu)
>>> text = model.generate("ROMEO:", max_new_tokens=40, seed=0)  # sampled; the seed repeats it
>>> text == model.generate("ROMEO:", max_new_tokens=40, seed=0)
True
>>> pieces = list(model.stream("ROMEO:", max_new_tokens=40, temperature=0))  # as generated
>>> "".join(pieces) == model.generate("ROMEO:", max_new_tokens=40, temperature=0)
True

One loaded Model serves any number of threads at once: every call keeps its state (tokens, cache,
random generators) to itself, and ONNX Runtime sessions are thread-safe.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard, Unpack, overload

import numpy as np

from runtime.errors import ConfigError, GenerationError
from runtime.files import DEFAULT_MODEL
from runtime.generation import GenerationLoop, TextTracker, Token, prefill
from runtime.sampling import CONTEXT_MODES, SamplingConfig, SamplingOptions, log_softmax
from runtime.session import OnnxSession
from runtime.tokenizer import Tokenizer

__all__ = ["CONTEXT_MODES", "GenerationResult", "Model", "ScoreResult", "Stream", "Token", "load"]


@dataclass
class GenerationResult:
    """One prompt's continuation, with what an application may want besides the text."""

    text: str  # the continuation only (no prompt), cut before any stop string
    token_ids: list[int]  # generated ids, including a final <|endoftext|> if there was one
    finish_reason: str  # "length", "eot" or "stop"
    prompt_tokens: int  # how many tokens the prompt encoded to
    logprobs: list[float] | None = None  # log p of each generated id, with logprobs=True


@dataclass
class ScoreResult:
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)  # log p(token | everything before it)

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood); NaN for an empty text."""
        return math.exp(-sum(self.logprobs) / len(self.logprobs)) if self.logprobs else math.nan


def load(
    path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    threads: int | None = None,
    optimization: str = "all",
    allow_fallback: bool = False,
    cache: bool = True,
) -> Model:
    """Load an exported gptkit model; weights, config and tokenizer all come from the one file.

    device: "cpu", or "cuda" with onnxruntime-gpu installed (an error otherwise, unless
    ``allow_fallback=True``, which runs on the CPU instead). threads: ONNX Runtime intra-op
    threads (default: one per core). optimization: ONNX Runtime graph optimisation level, one of
    none, basic, extended, all. cache: keep ONNX Runtime's optimised graph of large models
    (>= 32 MiB) in the gptkit cache directory so later loads skip that work (see
    :mod:`runtime.graph_cache`; files are written there on the first load).
    """
    return Model(
        OnnxSession(
            path,
            device=device,
            threads=threads,
            optimization=optimization,
            allow_fallback=allow_fallback,
            cache=cache,
        )
    )


class Model:
    """A loaded model. Use :func:`load` to make one.

    Generation options are :class:`SamplingConfig` fields, given as a ``SamplingConfig`` or as
    keywords (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``repetition_penalty``, ``seed``, ``stop``, ``stop_at_eot``), keywords overriding. ``context``
    is "error" (default: prompt + max_new_tokens over the context raises GenerationError) or
    "truncate" (keep the most recent tokens; see :mod:`runtime.generation`).
    """

    def __init__(self, session: OnnxSession) -> None:
        self._session = session
        self.metadata = session.metadata
        self.tokenizer: Tokenizer = session.metadata.tokenizer
        self.config: dict[str, Any] = dict(session.metadata.config)
        self.device: str = session.device

    @property
    def block_size(self) -> int:
        """The context length: prompt plus generated tokens fit in this many."""
        return self.metadata.block_size

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({self._session.path.name}: {c['n_layer']} layers, {c['n_embd']} wide, "
            f"context {c['block_size']}, vocab {self.tokenizer.n_vocab}, {self.device})"
        )

    # ---- text in, text out --------------------------------------------------------------------

    @overload
    def generate(  # type: ignore[overload-overlap]  # a str is also a Sequence[str]
        self,
        prompt: str,
        sampling: SamplingConfig | None = ...,
        *,
        context: str = ...,
        **options: Unpack[SamplingOptions],
    ) -> str: ...
    @overload
    def generate(
        self,
        prompt: Sequence[str],
        sampling: SamplingConfig | None = ...,
        *,
        context: str = ...,
        **options: Unpack[SamplingOptions],
    ) -> list[str]: ...
    def generate(
        self,
        prompt: str | Sequence[str],
        sampling: SamplingConfig | None = None,
        *,
        context: str = "error",
        **options: Unpack[SamplingOptions],
    ) -> str | list[str]:
        """The continuation of ``prompt``; a list of prompts gives a list, generated as one batch.

        >>> text = model.generate("ROMEO:", max_new_tokens=20, temperature=0)  # greedy
        >>> texts = model.generate(["ROMEO:", "JULIET:"], max_new_tokens=20, temperature=0)
        >>> len(texts)
        2
        """
        results = self.complete(prompt, sampling, context=context, **options)
        if isinstance(results, GenerationResult):
            return results.text
        return [r.text for r in results]

    @overload
    def complete(  # type: ignore[overload-overlap]  # a str is also a Sequence[str]
        self,
        prompt: str,
        sampling: SamplingConfig | None = ...,
        *,
        context: str = ...,
        logprobs: bool = ...,
        **options: Unpack[SamplingOptions],
    ) -> GenerationResult: ...
    @overload
    def complete(
        self,
        prompt: Sequence[str],
        sampling: SamplingConfig | None = ...,
        *,
        context: str = ...,
        logprobs: bool = ...,
        **options: Unpack[SamplingOptions],
    ) -> list[GenerationResult]: ...
    def complete(
        self,
        prompt: str | Sequence[str],
        sampling: SamplingConfig | None = None,
        *,
        context: str = "error",
        logprobs: bool = False,
        **options: Unpack[SamplingOptions],
    ) -> GenerationResult | list[GenerationResult]:
        """Like :meth:`generate`, as :class:`GenerationResult` (ids, finish reason, logprobs).

        ``logprobs=True`` adds each generated token's log-probability under the model (before
        temperature and the other processors).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            return []
        cfg = _sampling(sampling, options)
        loop = self._loop(prompts, cfg, context, logprobs)
        trackers = [TextTracker(self.tokenizer, cfg) for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        for token in loop:
            tracker = trackers[token.row]
            tracker.add(token.id)
            if token.logprob is not None:
                lps[token.row].append(token.logprob)
            if tracker.finished:
                loop.stop(token.row)
        results = []
        for b, tracker in enumerate(trackers):
            tracker.take_rest()
            results.append(
                GenerationResult(
                    text=tracker.text,
                    token_ids=loop.tokens[b][loop.prompt_lengths[b] :],
                    finish_reason=tracker.reason or "length",
                    prompt_tokens=loop.prompt_lengths[b],
                    logprobs=lps[b] if logprobs else None,
                )
            )
        return results[0] if isinstance(prompt, str) else results

    def stream(
        self,
        prompt: str,
        sampling: SamplingConfig | None = None,
        *,
        context: str = "error",
        logprobs: bool = False,
        **options: Unpack[SamplingOptions],
    ) -> Stream:
        """Yield the continuation piece by piece, as soon as each piece is final.

        A piece never splits a UTF-8 character, and text that might begin a stop string is held
        back until it is known not to. Bad options and an over-long prompt raise here, before
        iteration starts. After the loop, ``stream.result`` is the :class:`GenerationResult`.

        >>> stream = model.stream("ROMEO:", max_new_tokens=20, seed=0)
        >>> text = "".join(stream)  # or: for piece in stream: print(piece, end="", flush=True)
        >>> stream.result.text == text
        True
        """
        if not isinstance(prompt, str):
            raise ConfigError("stream() takes one prompt string; use generate() for a batch")
        cfg = _sampling(sampling, options)
        loop = self._loop([prompt], cfg, context, logprobs)
        return Stream(loop, TextTracker(self.tokenizer, cfg), logprobs)

    def score(self, text: str | Sequence[int]) -> ScoreResult:
        """Per-token log-probabilities of ``text`` (each given everything before it), perplexity.

        ``text`` is a string or a list of token ids. The first token is scored after
        <|endoftext|>, the way GPT-2 starts a document, so every token counts. It must fit in
        the context.

        >>> result = model.score("To be, or not to be")
        >>> len(result.logprobs) == len(result.token_ids)  # log p of every token
        True
        >>> result.perplexity >= 1.0  # exp(mean negative log p)
        True
        """
        if isinstance(text, str):
            ids = self.tokenizer.encode(text)
        elif _is_id_list(text):
            ids = [int(t) for t in text]
            bad = [t for t in ids if not 0 <= t < self.tokenizer.n_vocab]
            if bad:
                raise ConfigError(f"token id {bad[0]} is outside 0..{self.tokenizer.n_vocab - 1}")
        else:
            raise ConfigError(f"score() takes a string or token ids, got {type(text).__name__}")
        eot = self.tokenizer.eot_token
        inputs = ([eot] + ids[:-1]) if eot >= 0 else ids[:-1]
        targets = ids if eot >= 0 else ids[1:]
        if not targets:
            return ScoreResult(token_ids=ids)
        if len(inputs) > self.block_size:
            raise GenerationError(
                f"text is {len(ids)} tokens but the model's context is {self.block_size}; "
                "score a shorter text"
            )
        session = self._session
        n = len(inputs)
        wanted = np.array(targets)
        picked: list[float] = []

        def keep(start: int, logits: np.ndarray) -> None:  # one prefill chunk's logits
            logp = log_softmax(logits[0, :, : self.tokenizer.n_vocab])  # [chunk, n_vocab]
            rows = np.arange(logp.shape[0])
            picked.extend(float(x) for x in logp[rows, wanted[start : start + len(rows)]])

        prefill(
            session,
            np.array([inputs], dtype=np.int64),
            np.ones((1, n), dtype=np.int64),
            np.arange(n, dtype=np.int64)[None],
            session.empty_cache(1, capacity=n),
            on_logits=keep,
        )
        return ScoreResult(token_ids=ids, logprobs=picked)

    # ---- token ids in, token ids out ----------------------------------------------------------

    def generate_tokens(
        self,
        prompt_ids: Sequence[int] | Sequence[Sequence[int]],
        sampling: SamplingConfig | None = None,
        *,
        context: str = "error",
        logprobs: bool = False,
        **options: Unpack[SamplingOptions],
    ) -> Iterator[Token]:
        """The token-level loop under :meth:`generate`: ids in, :class:`Token` events out.

        ``prompt_ids`` is one list of ids or a list of them (a batch). Rows stop at
        <|endoftext|> (unless ``stop_at_eot=False``) and after ``max_new_tokens``; stop strings,
        being text, are :meth:`generate`'s business.
        """
        if _is_id_list(prompt_ids):
            rows = [[int(t) for t in prompt_ids]]
        elif isinstance(prompt_ids, Sequence) and all(_is_id_list(r) for r in prompt_ids):
            rows = [[int(t) for t in r] for r in prompt_ids if _is_id_list(r)]  # (all are)
        else:
            raise ConfigError("prompt_ids must be a list of token ids or a list of such lists")
        cfg = _sampling(sampling, options)
        return iter(
            GenerationLoop(
                self._session,
                rows,
                cfg,
                n_vocab=self.tokenizer.n_vocab,
                eot_token=self.tokenizer.eot_token,
                context=context,
                logprobs=logprobs,
            )
        )

    # ---- helpers ------------------------------------------------------------------------------

    def _loop(
        self, prompts: list[str], cfg: SamplingConfig, context: str, logprobs: bool
    ) -> GenerationLoop:
        rows = [self._encode_prompt(p) for p in prompts]
        return GenerationLoop(
            self._session,
            rows,
            cfg,
            n_vocab=self.tokenizer.n_vocab,
            eot_token=self.tokenizer.eot_token,
            context=context,
            logprobs=logprobs,
        )

    def _encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompts must be strings, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        if ids:
            return ids
        if self.tokenizer.eot_token < 0:  # an empty prompt starts a new document
            raise GenerationError(
                "empty prompt, and this tokenizer has no <|endoftext|> to start from"
            )
        return [self.tokenizer.eot_token]


class Stream:
    """Text pieces of one continuation, produced as the model generates them.

    Iterate once. ``token_ids`` grows as tokens are generated (so an interrupted stream still
    says how far it got); ``result`` is set when the iteration ends.
    """

    def __init__(self, loop: GenerationLoop, tracker: TextTracker, logprobs: bool) -> None:
        self._loop = loop
        self._tracker = tracker
        self._logprobs = logprobs
        self._pieces = self._run()
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        tracker = self._tracker
        for token in self._loop:
            self.token_ids.append(token.id)
            if token.logprob is not None:
                self.logprobs.append(token.logprob)
            tracker.add(token.id)
            if tracker.finished:
                self._loop.stop(0)
            piece = tracker.take_ready()
            if piece:
                yield piece
        rest = tracker.take_rest()
        self.result = GenerationResult(
            text=tracker.text,
            token_ids=self.token_ids,
            finish_reason=tracker.reason or "length",
            prompt_tokens=self._loop.prompt_lengths[0],
            logprobs=self.logprobs if self._logprobs else None,
        )
        if rest:
            yield rest


def _is_id_list(value: object) -> TypeGuard[Sequence[int]]:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    )


def _sampling(sampling: SamplingConfig | None, options: SamplingOptions) -> SamplingConfig:
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise ConfigError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    base = sampling or SamplingConfig()
    if not options:
        return base
    valid = {f.name for f in dataclasses.fields(SamplingConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(
            f"unknown generation option {unknown[0]!r}; valid: {', '.join(sorted(valid))}"
        )
    # Typed loosely on purpose: SamplingConfig checks every value and normalises ``stop`` (one
    # string or a list of them) to a tuple, so the options may be wider than the field types.
    changes: dict[str, Any] = dict(options)
    return dataclasses.replace(base, **changes)
