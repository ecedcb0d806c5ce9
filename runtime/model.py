"""The embedding API: load an exported model and generate, stream or score text.

>>> import runtime
>>> model = runtime.load("model.onnx")                                   # doctest: +SKIP
>>> model.generate("ROMEO:", max_new_tokens=40, seed=0)                  # doctest: +SKIP
>>> for piece in model.stream("ROMEO:", temperature=0): print(piece, end="")  # doctest: +SKIP

One loaded Model serves any number of threads at once: every call keeps its state (tokens, cache,
random generator) to itself, and ONNX Runtime sessions are thread-safe.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import ConfigError, GenerationError
from runtime.sampling import SamplingConfig, choose_token, log_softmax
from runtime.session import OnnxSession
from runtime.tokenizer import Tokenizer

CONTEXT_MODES = ("error", "truncate")


@dataclass
class GenerationResult:
    text: str  # the continuation only (no prompt), cut before any stop string
    token_ids: list[int]  # generated ids (including a final <|endoftext|>, if any)
    finish_reason: str  # "length", "eot" or "stop"
    logprobs: list[float] | None = None  # model log-probability of each generated id, on request


@dataclass
class ScoreResult:
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)  # log p(token | everything before it)

    @property
    def perplexity(self) -> float:
        return math.exp(-sum(self.logprobs) / len(self.logprobs)) if self.logprobs else float("nan")


def load(
    path: str | os.PathLike[str] = "model.onnx",
    *,
    device: str = "cpu",
    threads: int | None = None,
    optimization: str = "all",
    allow_fallback: bool = False,
) -> Model:
    """Load an exported gptkit model; everything (weights, config, tokenizer) comes from the file.

    device: "cpu", or "cuda" with onnxruntime-gpu installed (an error otherwise, unless
    ``allow_fallback=True``, which runs on the CPU instead). threads: ONNX Runtime intra-op threads.
    optimization: ONNX Runtime graph optimisation level: none, basic, extended or all.
    """
    return Model(
        OnnxSession(
            path,
            device=device,
            threads=threads,
            optimization=optimization,
            allow_fallback=allow_fallback,
        )
    )


class Model:
    """A loaded model. Use :func:`load` to make one."""

    def __init__(self, session: OnnxSession) -> None:
        self._session = session
        self.metadata = session.metadata
        self.tokenizer: Tokenizer = session.metadata.tokenizer
        self.config: dict = dict(session.metadata.config)
        self.device = session.device

    @property
    def block_size(self) -> int:
        """The context length: prompt plus generated tokens can be at most this long."""
        return self.metadata.block_size

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({self._session.path.name}: {c['n_layer']} layers, {c['n_embd']} wide, "
            f"context {c['block_size']}, vocab {self.tokenizer.n_vocab}, {self.device})"
        )

    # ---- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str],
        sampling: SamplingConfig | None = None,
        *,
        context: str = "error",
        **options,
    ) -> str | list[str]:
        """The continuation of ``prompt`` (a list of prompts gives a list, generated as one batch).

        Options are :class:`SamplingConfig` fields (``max_new_tokens``, ``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``repetition_penalty``, ``seed``, ``stop``, ``stop_at_eot``).
        context: "error" (default) refuses prompt + max_new_tokens over the block size;
        "truncate" keeps only the most recent tokens (re-prefilling, positions being absolute).
        """
        results = self.generate_results(prompt, sampling, context=context, **options)
        texts = [r.text for r in results]
        return texts[0] if isinstance(prompt, str) else texts

    def generate_results(
        self,
        prompt: str | Sequence[str],
        sampling: SamplingConfig | None = None,
        *,
        context: str = "error",
        logprobs: bool = False,
        **options,
    ) -> list[GenerationResult]:
        """Like :meth:`generate`, with token ids, finish reasons and (on request) log-probabilities."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            return []
        cfg = _sampling(sampling, options)
        trackers = [_StopTracker(self.tokenizer, cfg) for _ in prompts]
        done = [False] * len(prompts)
        ids = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        for row, token, logprob in self._decode(
            self._encode_prompts(prompts), cfg, context, done, logprobs
        ):
            ids[row].append(token)
            if logprob is not None:
                lps[row].append(logprob)
            trackers[row].add(token)
            done[row] = trackers[row].finished
        return [
            GenerationResult(
                text=t.final_text(),
                token_ids=i,
                finish_reason=t.reason or "length",
                logprobs=lp if logprobs else None,
            )
            for t, i, lp in zip(trackers, ids, lps, strict=True)
        ]

    def stream(
        self,
        prompt: str,
        sampling: SamplingConfig | None = None,
        *,
        context: str = "error",
        **options,
    ) -> Iterator[str]:
        """Yield the continuation piece by piece, as soon as each piece is known to be final.

        Pieces never split a UTF-8 character, and text that might be the start of a stop string
        is held back until it is known not to be one.
        """
        if not isinstance(prompt, str):
            raise ConfigError("stream() takes one prompt string; use generate() for a batch")
        cfg = _sampling(sampling, options)
        tracker = _StopTracker(self.tokenizer, cfg)
        done = [False]
        for _, token, _ in self._decode(self._encode_prompts([prompt]), cfg, context, done, False):
            tracker.add(token)
            done[0] = tracker.finished
            piece = tracker.take_ready()
            if piece:
                yield piece
        rest = tracker.take_rest()
        if rest:
            yield rest

    def score(self, text: str) -> ScoreResult:
        """Per-token log-probabilities of ``text`` (each given everything before it) and perplexity.

        The first token is scored after <|endoftext|>, the way GPT-2 starts a document.
        """
        ids = self.tokenizer.encode(text)
        if not ids:
            return ScoreResult(token_ids=[])
        eot = self.tokenizer.eot_token
        inputs = ([eot] + ids[:-1]) if eot >= 0 else ids[:-1]
        targets = ids if eot >= 0 else ids[1:]
        if len(inputs) > self.block_size:
            raise GenerationError(
                f"text is {len(inputs)} tokens but the model's context is {self.block_size}; "
                "score a shorter text"
            )
        if not inputs:
            return ScoreResult(token_ids=ids)
        s = self._session
        out = s.step(
            np.array([inputs], dtype=np.int64),
            np.ones((1, len(inputs)), dtype=np.int64),
            np.arange(len(inputs), dtype=np.int64)[None],
            s.empty_cache(1),
        )
        logp = log_softmax(out.logits[0, :, : self.tokenizer.n_vocab])
        return ScoreResult(
            token_ids=ids, logprobs=[float(logp[i, t]) for i, t in enumerate(targets)]
        )

    # ---- the decoding loop --------------------------------------------------------------------

    def _encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        rows = []
        for p in prompts:
            if not isinstance(p, str):
                raise ConfigError(f"prompts must be strings, got {type(p).__name__}")
            ids = self.tokenizer.encode(p)
            if not ids:  # an empty prompt starts a new document
                if self.tokenizer.eot_token < 0:
                    raise GenerationError(
                        "empty prompt, and this tokenizer has no <|endoftext|> to start from"
                    )
                ids = [self.tokenizer.eot_token]
            rows.append(ids)
        return rows

    def _decode(
        self,
        prompts: list[list[int]],
        cfg: SamplingConfig,
        context: str,
        done: list[bool],
        want_logprobs: bool,
    ) -> Iterator[tuple[int, int, float | None]]:
        """Yield (row, token, logprob) as tokens are chosen; rows marked in ``done`` are skipped."""
        if context not in CONTEXT_MODES:
            raise ConfigError(f"unknown context mode {context!r}; choose error or truncate")
        block = self.block_size
        rows = [list(p) for p in prompts]
        if context == "error":
            longest = max(len(r) for r in rows)
            if longest + cfg.max_new_tokens > block:
                raise GenerationError(
                    f"prompt of {longest} tokens + max_new_tokens {cfg.max_new_tokens} = "
                    f"{longest + cfg.max_new_tokens} exceeds the model's context of {block} tokens; "
                    "shorten the prompt, lower max_new_tokens, or use context='truncate' (--context truncate)"
                )
        else:
            rows = [r[-(block - 1) :] for r in rows]
        n_vocab = self.tokenizer.n_vocab
        rng = np.random.default_rng(cfg.seed)
        logits, past, mask = self._prefill(rows)
        for step in range(cfg.max_new_tokens):
            chosen = []
            for b, row in enumerate(rows):
                if done[b]:
                    chosen.append(row[-1])
                    continue
                token = choose_token(logits[b], cfg, rng, n_vocab=n_vocab, context=row)
                logprob = float(log_softmax(logits[b, :n_vocab])[token]) if want_logprobs else None
                row.append(token)
                chosen.append(token)
                yield b, token, logprob
            if all(done) or step == cfg.max_new_tokens - 1:
                return
            if int(mask.sum(axis=1).max()) >= block:  # truncate mode only: rebuild a recent window
                logits, past, mask = self._prefill([r[-(block // 2) :] for r in rows])
            else:
                logits, past, mask = self._extend(chosen, past, mask)

    def _prefill(self, rows: list[list[int]]):
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = row  # left padding
            mask[b, width - len(row) :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        out = self._session.step(ids, mask, positions, self._session.empty_cache(len(rows)))
        return out.logits[:, -1, :], out.presents, mask

    def _extend(self, tokens: list[int], past, mask: np.ndarray):
        mask = np.concatenate([mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        positions = mask.sum(axis=1, keepdims=True) - 1
        out = self._session.step(np.array(tokens, dtype=np.int64)[:, None], mask, positions, past)
        return out.logits[:, -1, :], out.presents, mask


class _StopTracker:
    """Decodes one row's tokens, finds stop strings and <|endoftext|>, and releases safe text."""

    def __init__(self, tokenizer: Tokenizer, cfg: SamplingConfig) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._eot = tokenizer.eot_token if cfg.stop_at_eot else None
        self._stops = cfg.stop
        self._hold = max((len(s) for s in cfg.stop), default=1) - 1
        self.text = ""  # decoded so far (cut at a stop string once found)
        self.released = 0  # how much of text has been handed out by take_ready
        self.reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def add(self, token: int) -> None:
        if self.finished:
            return
        if token == self._eot:
            self.text += self._decoder.flush()
            self.reason = "eot"
            return
        self.text += self._decoder.add(token)
        if self._stops:
            start = max(0, self.released - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.reason = "stop"

    def take_ready(self) -> str:
        """Text that can no longer become part of a stop string."""
        end = len(self.text) if self.finished else self._safe_end()
        piece = self.text[self.released : end]
        self.released = max(self.released, end)
        return piece

    def take_rest(self) -> str:
        if not self.finished:
            self.text += self._decoder.flush()
        piece = self.text[self.released :]
        self.released = len(self.text)
        return piece

    def final_text(self) -> str:
        self.take_rest()
        return self.text

    def _safe_end(self) -> int:
        for keep in range(min(self._hold, len(self.text)), 0, -1):
            tail = self.text[-keep:]
            if any(s.startswith(tail) for s in self._stops):
                return len(self.text) - keep
        return len(self.text)


def _sampling(sampling: SamplingConfig | None, options: dict) -> SamplingConfig:
    base = sampling or SamplingConfig()
    if not options:
        return base
    valid = {f.name for f in dataclasses.fields(SamplingConfig)}
    unknown = set(options) - valid
    if unknown:
        raise ConfigError(
            f"unknown generation option(s): {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}"
        )
    return dataclasses.replace(base, **options)
