"""The decoding loop: one prefill, then one token per step with the KV cache fed back.

A batch of prompts is left-padded into one [B, T] prefill; the attention mask marks real tokens and
position ids are ``cumsum(mask) - 1`` clamped at 0, so every row sees exactly the positions it
would see alone (positions counted over the padded width would shift every padded row).
Each row stops on its own: once finished it is fed a masked
dummy token (mask 0), so it uses no position and leaves the other rows untouched.

Positions are absolute and learned (``wpe`` has ``block_size`` rows), so the cache cannot slide
(a position past the last ``wpe`` row has no embedding). ``context="error"`` refuses a request whose prompt + ``max_new_tokens`` would pass the
context; ``context="truncate"`` keeps the most recent ``block_size`` prompt tokens and, whenever a
row's window is full, re-prefills the most recent three quarters of the window: every token is
then generated with at least 3/4 of a context behind it, and the re-prefill costs about one
prompt-sized forward pass per ``block_size / 4`` generated tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from runtime.errors import ConfigError, GenerationError
from runtime.sampling import (
    CONTEXT_MODES,
    DEFAULT_MAX_NEW_TOKENS,
    SamplingConfig,
    choose_token,
    log_softmax,
)
from runtime.session import KVCache, OnnxSession
from runtime.tokenizer import Tokenizer

# Prompt tokens per forward pass. A long prompt in one pass needs logits [B, T, vocab] and
# activations for all T at once; in chunks the peak memory is one chunk's, and the time is no
# worse (the README's performance section has the figures for gpt2).
PREFILL_CHUNK = 64


@dataclass(frozen=True)
class Token:
    """One generated token of one row of the batch."""

    row: int
    id: int
    logprob: float | None = None  # log p(id | row so far) under the model, before any processor


class GenerationLoop:
    """One generation call's state: token rows, attention mask, KV cache and one RNG per row.

    Iterating yields :class:`Token` events, row by row within each step. :meth:`stop` finishes a
    row early (stop strings are found by the caller, which decodes text). Not thread-safe, and
    need not be: every call to ``Model.generate``/``stream`` makes its own.
    """

    def __init__(
        self,
        session: OnnxSession,
        prompts: list[list[int]],
        config: SamplingConfig,
        *,
        n_vocab: int,
        eot_token: int = -1,
        context: str = "error",
        logprobs: bool = False,
    ) -> None:
        if context not in CONTEXT_MODES:
            raise ConfigError(f"unknown context mode {context!r}; choose error or truncate")
        if not prompts or any(not p for p in prompts):
            raise GenerationError("every prompt needs at least one token")
        self._session = session
        self._config = config
        self._n_vocab = n_vocab
        self._eot = eot_token if config.stop_at_eot else None
        self._logprobs = logprobs
        self._block = session.metadata.block_size
        self._truncate = context == "truncate"
        max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:  # "up to the default, or what fits in the context"
            longest = max(len(p) for p in prompts)
            room = self._block - longest if not self._truncate else DEFAULT_MAX_NEW_TOKENS
            max_new_tokens = max(1, min(room, DEFAULT_MAX_NEW_TOKENS))
            config = dataclasses.replace(config, max_new_tokens=max_new_tokens)
            self._config = config
        self._max_new_tokens = max_new_tokens
        for i, prompt in enumerate(prompts):
            bad = [t for t in prompt if not 0 <= t < n_vocab]
            if bad:
                raise GenerationError(
                    f"token id {bad[0]} is outside the vocabulary 0..{n_vocab - 1}"
                )
            if not self._truncate and len(prompt) + max_new_tokens > self._block:
                which = f"prompt {i + 1} of {len(prompts)}" if len(prompts) > 1 else "the prompt"
                raise GenerationError(
                    f"{which} is {len(prompt)} tokens + max_new_tokens {max_new_tokens} = "
                    f"{len(prompt) + max_new_tokens}, over the model's context of "
                    f"{self._block} tokens; shorten the prompt, lower max_new_tokens, or use "
                    "context='truncate' (--context truncate)"
                )
        self.tokens = [list(p) for p in prompts]  # prompt + generated, per row
        self.prompt_lengths = [len(p) for p in prompts]
        self.done = [False] * len(prompts)
        seeds = np.random.SeedSequence(config.seed).spawn(len(prompts))
        # One generator per row, keyed by the row's index: a row's samples do not depend on what
        # the other rows draw, and row 0 of a batch samples exactly as the prompt would alone.
        self._rngs = [np.random.default_rng(s) for s in seeds]
        self.prefills = 0  # how many times the cache was (re)built; > 1 only when truncating
        self._lengths = np.zeros(len(prompts), dtype=np.int64)  # mask.sum(axis=1), kept up

    def stop(self, row: int) -> None:
        self.done[row] = True

    def __iter__(self) -> Iterator[Token]:
        cfg = self._config
        n_vocab, eot, want_logprobs = self._n_vocab, self._eot, self._logprobs
        penalises, plain_greedy = cfg.penalises_generated, cfg.plain_greedy
        rows, done, rngs = self.tokens, self.done, self._rngs
        logits, cache, mask = self._prefill(self._block)
        for step in range(self._max_new_tokens):
            # Plain greedy: one argmax over the batch instead of one choose_token per row.
            picks = _greedy_picks(logits, n_vocab) if plain_greedy else None
            chosen = np.zeros(len(rows), dtype=np.int64)
            for b, row in enumerate(rows):
                if done[b]:
                    continue
                generated = row[self.prompt_lengths[b] :] if penalises else ()
                token = choose_token(
                    logits[b],
                    cfg,
                    rngs[b],
                    n_vocab=n_vocab,
                    context=row,
                    generated=generated,
                    argmax=picks[b] if picks is not None else None,
                )
                logprob = None
                if want_logprobs:
                    logprob = float(log_softmax(logits[b, :n_vocab])[token])
                row.append(token)
                chosen[b] = token
                if token == eot:
                    done[b] = True
                yield Token(b, token, logprob)
            if step == self._max_new_tokens - 1 or all(done):
                return
            active = ~np.array(done)
            window_full = self._truncate and int(self._lengths[active].max()) >= self._block
            # An in-place cache holds `capacity` columns; finished rows' masked dummies widen
            # the mask too, so re-prefill (which drops them) before it overflows.
            cache_full = 0 < cache.capacity <= mask.shape[1]
            if window_full:
                logits, cache, mask = self._prefill(self._block - self._block // 4)
            elif cache_full:  # compact: the same context for every active row, no dummies
                logits, cache, mask = self._prefill(self._block)
            else:
                logits, cache, mask = self._extend(chosen, active, cache, mask)

    def _prefill(self, keep: int) -> tuple[np.ndarray, KVCache, np.ndarray]:
        """Run the last ``keep`` tokens of every row, left-padded, from an empty cache."""
        self.prefills += 1
        # A finished row keeps one token: its logits are never used again.
        rows = zip(self.tokens, self.done, strict=True)
        windows = [row[-1:] if done else row[-keep:] for row, done in rows]
        width = max(len(w) for w in windows)
        ids = np.zeros((len(windows), width), dtype=np.int64)
        mask = np.zeros((len(windows), width), dtype=np.int64)
        for b, window in enumerate(windows):
            ids[b, width - len(window) :] = window
            mask[b, width - len(window) :] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        self._lengths = mask.sum(axis=1)  # tokens each row has in the cache (its next position)
        session = self._session
        # What this generation can reach: the window plus the tokens still to come (a whole
        # block when truncating, since it re-prefills whenever the window fills up).
        room = self._block if self._truncate else width + self._max_new_tokens
        cache = session.empty_cache(len(windows), capacity=room)
        logits, cache = prefill(session, ids, mask, positions, cache)
        return logits[:, -1, :], cache, mask

    def _extend(
        self, chosen: np.ndarray, active: np.ndarray, cache: KVCache, mask: np.ndarray
    ) -> tuple[np.ndarray, KVCache, np.ndarray]:
        """Feed each active row its new token; finished rows get a masked dummy at position 0."""
        new = active.astype(np.int64)  # [B]
        mask = np.concatenate([mask, new[:, None]], axis=1)  # [B, P+1]
        positions = self._lengths * new  # [B]: mask.sum(axis=1) - 1 after the new column
        self._lengths = self._lengths + new
        # The logits are read before the next step, so they may stay in the step's buffer.
        logits, cache = self._session.run(
            chosen[:, None], mask, positions[:, None], cache, reuse=True
        )
        return logits[:, -1, :], cache, mask


def prefill(
    session: OnnxSession,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    position_ids: np.ndarray,
    cache: KVCache,
    on_logits: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, KVCache]:
    """Run a prompt into ``cache`` in chunks of PREFILL_CHUNK tokens; the last chunk's logits.

    ``on_logits(start, logits)`` sees every chunk's logits (score() needs all of them). ONNX
    Runtime's GroupQueryAttention takes several tokens on a non-empty cache for one row only, so
    a batch on an in-place cache goes in one pass.
    """
    batch, width = input_ids.shape
    chunk = PREFILL_CHUNK if batch == 1 or not session.inplace else width
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        logits, cache = session.run(
            input_ids[:, start:end], attention_mask[:, :end], position_ids[:, start:end], cache
        )
        if on_logits is not None:
            on_logits(start, logits)
    return logits, cache


def _greedy_picks(logits: np.ndarray, n_vocab: int) -> list[int | None]:
    """Each row's argmax over the valid ids where it is finite, else None (a NaN or +inf:
    choose_token deals with those): choose_token's greedy fast path, for the batch at once."""
    valid = logits[:, :n_vocab]
    tokens = valid.argmax(axis=1).tolist()  # NB: the first NaN if a row has one, as per row
    return [t if math.isfinite(row[t]) else None for row, t in zip(valid, tokens, strict=True)]


class TextTracker:
    """Decodes one row's tokens to text, finds stop strings and releases text that is final.

    Text that could still be the start of a stop string is held back, and bytes of an incomplete
    UTF-8 character wait for the rest (a byte-level BPE token can end mid-character), so a released piece never changes later.
    """

    def __init__(self, tokenizer: Tokenizer, config: SamplingConfig) -> None:
        self._utf8 = tokenizer.stream_decoder()
        self._eot = tokenizer.eot_token if config.stop_at_eot else None
        self._stops = config.stop
        self._hold = max((len(s) for s in config.stop), default=1) - 1
        self.text = ""  # decoded so far (cut before the stop string once one is found)
        self.released = 0  # how much of text take_ready/take_rest have handed out
        self.reason: str | None = None  # "eot" or "stop" once finished

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def add(self, token: int) -> None:
        if self.finished:
            return
        if token == self._eot:
            self.text += self._utf8.flush()
            self.reason = "eot"
            return
        self.text += self._utf8.add(token)
        if self._stops:
            start = max(0, self.released - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.reason = "stop"

    def take_ready(self) -> str:
        """New text that can no longer become part of a stop string."""
        end = len(self.text) if self.finished else self._safe_end()
        piece = self.text[self.released : end]
        self.released = max(self.released, end)
        return piece

    def take_rest(self) -> str:
        """Everything not yet released, including a flushed incomplete character (as U+FFFD)."""
        if not self.finished:
            self.text += self._utf8.flush()
        piece = self.text[self.released :]
        self.released = len(self.text)
        return piece

    def _safe_end(self) -> int:
        for keep in range(min(self._hold, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-keep:]) for s in self._stops):
                return len(self.text) - keep
        return len(self.text)
