"""Continuous batching: many requests share one session, one token per request per step.

An :class:`Engine` owns an :class:`~runtime.session.OnnxSession` and one thread that runs the
loop. Each step:

1. admits waiting requests into free slots, and ends cancelled ones (their slot is free at once);
2. runs one prefill chunk (``PREFILL_CHUNK`` tokens) of one joining request, batch 1, so a long
   prompt delays the running streams by at most one chunk per step;
3. decodes one token for every running request in one batched forward pass.

A request never waits for the others to finish, and its output does not depend on who else is
in the batch: it samples with its own seeded generator (the one ``runtime.load(...).generate``
uses for the same seed), and rows of a batched pass only share matrix products.

Two cache layouts, chosen by the file (``runtime.onnx_contract``):

* ``--kv-cache inplace`` (the fast path): one buffer per layer's key and value,
  [max_batch, n_head, block_size, head_dim], slot-major so one slot's rows are contiguous and a
  decode step binds a view of the slots below the highest running one (no copy). ONNX Runtime's
  GroupQueryAttention writes every row of a step at the same cache column (the export sets
  ``seqlens_k`` to the mask width minus one), so the slots share a timeline: the next step writes
  column ``column`` for every running row, a joining prompt (prefilled, in chunks, into a cache
  of its own length, whose cost does not grow with the slot's capacity) is copied into the
  columns just before it, and the attention mask hides whatever a slot does not own (older
  requests' leftovers, columns skipped while it waited).
  When the timeline reaches the buffer's end, or holes make up most of it (attention reads
  every column up to the current one), every slot's columns are moved to the left
  (``compact``): a copy of the live cache, about once per live length of steps.
  A decode step binds the slots [0, hi) below the highest running one; free or prefilling
  slots in that range run a masked dummy token.
* default (concat) exports: the running rows' caches are stacked into [B, n_head, P, head_dim]
  arrays, left-padded, that the graph extends by one column per step; the stack is rebuilt
  only when a request joins or leaves.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from runtime.errors import (
    ConfigError,
    ContextLengthError,
    EngineClosedError,
    GenerationError,
    GptkitError,
    QueueFullError,
)
from runtime.generation import PREFILL_CHUNK, TextTracker
from runtime.metadata import ModelMetadata
from runtime.model import GenerationResult
from runtime.sampling import SamplingConfig, choose_token, log_softmax
from runtime.session import KVCache, OnnxSession
from runtime.tokenizer import Tokenizer

__all__ = ["Engine", "EngineStats", "Event", "Request"]

log = logging.getLogger("gptkit.engine")

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64
MAX_TOP_LOGPROBS = 20
# Dead columns the shared timeline may carry before it is compacted early (see _SharedBuffer).
HOLE_SLACK = 64
FINISH_REASONS = ("length", "stop", "eot", "cancelled", "error")


@dataclass(frozen=True)
class Event:
    """What a request produced in one step; the last event has a ``finish_reason``."""

    token_id: int | None  # None only on a final event without a token (cancelled, error)
    text: str  # text that became final with this token: whole characters, never a stop string
    logprob: float | None = None  # log p(token) before temperature etc., if logprobs were asked
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (id, logprob), best first
    finish_reason: str | None = None  # None while running; else one of FINISH_REASONS
    error: str | None = None  # one line, when finish_reason == "error"


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests holding a slot (prefilling or decoding)
    waiting: int  # requests queued for a slot
    busy_slots: int
    max_batch: int
    steps: int  # forward passes so far (prefill chunks and decode steps)
    generated_tokens: int


class Request:
    """A submitted request: iterate its events, wait for its result, or cancel it."""

    def __init__(
        self,
        engine: Engine,
        request_id: int,
        prompt_ids: list[int],
        config: SamplingConfig,
        top_logprobs: int | None,
        seed_row: int,
        on_event: Callable[[Event], None] | None,
    ) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.config = config
        self.top_logprobs = top_logprobs
        self.seed_row = seed_row
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._engine = engine
        self._on_event = on_event
        self._events: queue.SimpleQueue[Event] | None = (
            queue.SimpleQueue() if on_event is None else None
        )
        self._done = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating; the slot is free within one step. Harmless once finished."""
        if not self._done.is_set():
            self.cancelled = True
            self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[Event]:
        if self._events is None:
            raise ConfigError("this request delivers its events to on_event; it cannot be iterated")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end; the completion as :class:`~runtime.model.GenerationResult`."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.finish_reason == "error":
            raise GenerationError(self.error or "generation failed")
        return GenerationResult(
            text=self.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=self.prompt_tokens,
            logprobs=list(self.logprobs) if self.top_logprobs is not None else None,
        )

    def _emit(self, event: Event) -> None:
        """Record and deliver one event (engine thread only)."""
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
            if event.logprob is not None:
                self.logprobs.append(event.logprob)
        self.text += event.text
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error
        if self._events is not None:
            self._events.put(event)
        elif self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a consumer's bug must not stop the engine
                log.exception("on_event of request %d raised; cancelling it", self.id)
                self.cancelled = True
        if event.finish_reason is not None:
            self._done.set()


class _Active:
    """A request holding a slot: its row of tokens, RNG, text and prefill progress."""

    def __init__(self, request: Request, slot: int, tokenizer: Tokenizer, block: int) -> None:
        self.request = request
        self.slot = slot
        cfg = request.config
        self.tokens = list(request.prompt_ids)  # prompt + generated
        self.prompt_length = len(self.tokens)
        self.max_new_tokens = cfg.max_new_tokens or (block - self.prompt_length)
        seed = np.random.SeedSequence(cfg.seed, spawn_key=(request.seed_row,))
        self.rng = np.random.default_rng(seed)
        self.tracker = TextTracker(tokenizer, cfg)
        self.prefilled = 0  # prompt tokens already in the cache
        self.pending = -1  # the last sampled token, fed at the next decode step

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.prompt_length

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_length


class _Cache(Protocol):
    """Where the slots' keys and values live between steps."""

    def prefill(self, active: _Active, ids: np.ndarray) -> np.ndarray:
        """Run the next prompt chunk ``ids`` of ``active``; its logits [T, V]."""
        ...

    def decode(self, rows: list[_Active]) -> np.ndarray:
        """Feed every row its pending token at its next position; logits [len(rows), V]."""
        ...

    def release(self, active: _Active) -> None: ...


class Engine:
    """A continuous-batching loop over one model file. See the module docstring.

    >>> engine = Engine.load("model.onnx", max_batch=4)
    >>> engine.start()
    >>> ids = engine.tokenizer.encode("ROMEO:")
    >>> request = engine.submit(ids, SamplingConfig(max_new_tokens=20, temperature=0))
    >>> text = "".join(event.text for event in request)  # events as they are generated
    >>> engine.close()
    """

    def __init__(
        self,
        session: OnnxSession,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.session = session
        self.metadata: ModelMetadata = session.metadata
        self.tokenizer: Tokenizer = session.metadata.tokenizer
        self.block_size: int = session.metadata.block_size
        self.max_batch = max_batch
        self.max_queue = max_queue
        # The fast layout needs numpy buffers ONNX Runtime writes into: in-place files on the CPU.
        self.shared_buffer = session.inplace and session.device == "cpu"
        self._cache: _Cache = (
            _SharedBuffer(session, max_batch) if self.shared_buffer else _Stacked(session)
        )
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, _Active] = {}  # slot -> request
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopping = False
        self._steps = 0
        self._generated = 0

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        threads: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> Engine:
        """Open ``path`` and make an engine over it (call :meth:`start` to run it).

        On CUDA the engine stacks caches on the host (``io_binding=False``): correct, not fast.
        """
        session = OnnxSession(
            path, device=device, threads=threads, io_binding=False if device == "cuda" else None
        )
        return cls(session, max_batch=max_batch, max_queue=max_queue)

    # ---- the public side (any thread) -------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (once; later calls do nothing)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gptkit-engine", daemon=True)
                self._thread.start()

    def submit(
        self,
        prompt_ids: Sequence[int],
        config: SamplingConfig,
        *,
        top_logprobs: int | None = None,
        seed_row: int = 0,
        on_event: Callable[[Event], None] | None = None,
    ) -> Request:
        """Queue a request; it joins the batch at the next step with a free slot.

        Raises ContextLengthError, GenerationError (empty prompt, ids outside the vocabulary),
        QueueFullError or EngineClosedError at once, never later.
        """
        if not isinstance(config, SamplingConfig):
            raise ConfigError(f"config must be a SamplingConfig, got {type(config).__name__}")
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise GenerationError("the prompt has no tokens")
        n_vocab = self.tokenizer.n_vocab
        bad = [t for t in ids if not 0 <= t < n_vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary 0..{n_vocab - 1}")
        wanted = config.max_new_tokens or 1
        if len(ids) + wanted > self.block_size:
            raise ContextLengthError(len(ids), wanted, self.block_size)
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
        if isinstance(seed_row, bool) or not isinstance(seed_row, int) or seed_row < 0:
            raise ConfigError(f"seed_row must be a non-negative integer, got {seed_row!r}")
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is shutting down; it takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (max_queue "
                    f"{self.max_queue}); retry later"
                )
            request = Request(self, next(self._ids), ids, config, top_logprobs, seed_row, on_event)
            self._waiting.append(request)
            self._lock.notify()
        return request

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._active),
                waiting=len(self._waiting),
                busy_slots=len(self._active),
                max_batch=self.max_batch,
                steps=self._steps,
                generated_tokens=self._generated,
            )

    def close(self, drain_timeout: float = 0.0) -> None:
        """Take no new requests; let those in flight finish for ``drain_timeout`` s, then cancel."""
        with self._lock:
            self._closing = True
            self._lock.wait_for(lambda: not self._active and not self._waiting, drain_timeout)
            for request in [*self._waiting, *(a.request for a in self._active.values())]:
                request.cancelled = True
            self._stopping = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        else:  # never started: end the queued requests here
            for request in self._waiting:
                request._emit(Event(None, "", finish_reason="cancelled"))
            self._waiting.clear()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ---- the loop (engine thread only) ------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(
                    lambda: self._stopping or self._waiting or self._active, timeout=None
                )
                self._admit()
                self._end_cancelled()
                if self._stopping and not self._active and not self._waiting:
                    self._lock.notify_all()
                    return
                active = list(self._active.values())
            if not active:
                continue
            joining = next((a for a in active if a.prefilling), None)
            if joining is not None:
                self._guarded([joining], self._prefill_chunk, joining)
            running = [a for a in active if not a.prefilling and not a.request.done]
            if running:
                self._guarded(running, self._decode, running)
            with self._lock:
                for slot, a in list(self._active.items()):
                    if a.request.done:
                        self._free(slot)
                self._lock.notify_all()  # close() waits for the active set to empty

    def _admit(self) -> None:
        free = [s for s in range(self.max_batch) if s not in self._active]
        while self._waiting and free:
            request = self._waiting.popleft()
            if request.cancelled:
                request._emit(Event(None, "", finish_reason="cancelled"))
                continue
            slot = free.pop(0)
            self._active[slot] = _Active(request, slot, self.tokenizer, self.block_size)

    def _end_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request._emit(Event(None, "", finish_reason="cancelled"))
        for slot, a in list(self._active.items()):
            if a.request.cancelled:
                a.request._emit(Event(None, a.tracker.take_rest(), finish_reason="cancelled"))
                self._free(slot)

    def _free(self, slot: int) -> None:
        self._cache.release(self._active.pop(slot))

    def _guarded(self, rows: list[_Active], work: Callable[[Any], None], arg: Any) -> None:
        """Run one forward pass; a failure ends the requests in it, not the engine."""
        try:
            work(arg)
        except GptkitError as e:
            message = str(e)
        except Exception as e:  # a bug: keep serving the others, and say what happened
            log.exception("engine step failed")
            message = f"internal error in the engine ({type(e).__name__})"
        else:
            return
        for a in rows:
            if not a.request.done:
                a.request._emit(Event(None, "", finish_reason="error", error=message))

    def _prefill_chunk(self, a: _Active) -> None:
        start = a.prefilled
        end = min(start + PREFILL_CHUNK, a.prompt_length)
        logits = self._cache.prefill(a, np.asarray(a.tokens[start:end], dtype=np.int64))
        self._steps += 1
        a.prefilled = end
        if not a.prefilling:
            self._choose(a, logits[-1])

    def _decode(self, rows: list[_Active]) -> None:
        logits = self._cache.decode(rows)
        self._steps += 1
        for a, row_logits in zip(rows, logits, strict=True):
            self._choose(a, row_logits)

    def _choose(self, a: _Active, logits: np.ndarray) -> None:
        """Sample the next token of ``a`` and send its event; finish it if it is done."""
        request, cfg = a.request, a.request.config
        n_vocab = self.tokenizer.n_vocab
        generated = a.tokens[a.prompt_length :] if cfg.penalises_generated else ()
        token = choose_token(
            logits, cfg, a.rng, n_vocab=n_vocab, context=a.tokens, generated=generated
        )
        logprob: float | None = None
        top: tuple[tuple[int, float], ...] = ()
        if request.top_logprobs is not None:
            logp = log_softmax(logits[:n_vocab])
            logprob = float(logp[token])
            if request.top_logprobs:
                best = np.argpartition(-logp, request.top_logprobs - 1)[: request.top_logprobs]
                best = best[np.argsort(-logp[best], kind="stable")]
                top = tuple((int(i), float(logp[i])) for i in best)
        a.tokens.append(token)
        a.pending = token
        self._generated += 1
        tracker = a.tracker
        tracker.add(token)
        reason = tracker.reason
        if reason is None and a.generated >= a.max_new_tokens:
            reason = "length"
        text = tracker.take_ready() + (tracker.take_rest() if reason else "")
        request._emit(Event(token, text, logprob, top, reason))


class _SharedBuffer:
    """In-place caches of all slots in one buffer per layer, on a shared column timeline."""

    def __init__(self, session: OnnxSession, slots: int) -> None:
        m = session.metadata
        self.session = session
        self.capacity = m.block_size
        shape = (slots, m.n_head, self.capacity, m.head_dim)
        # Written once here, so the whole cache is resident from the start: memory is what the
        # slots can hold (as llama.cpp's server allocates its KV cache), and no request stalls on
        # the kernel mapping a slot's pages as it first writes them (measured: a 900-token prompt
        # joining a fresh slot of GPT-2 124M took 0.3-0.7 s in page faults, one step of ~20 ms).
        self.buffers = tuple(np.empty(shape, dtype=session.kv_dtype) for _ in session.past_names)
        for buffer in self.buffers:
            buffer.fill(0)
        self.valid = np.zeros((slots, self.capacity), dtype=np.int64)  # a slot's own columns
        self.column = 0  # the column the next decode step writes, for every row
        self.compactions = 0
        # A joining prompt is prefilled into a cache of its own length (ONNX Runtime's prompt
        # path costs what that cache holds, not what the slot could hold), then copied in.
        self.scratch: dict[int, KVCache] = {}
        self._views: dict[tuple[int, int], KVCache] = {}

    def _view(self, lo: int, hi: int, length: int) -> KVCache:
        """A cache bound to slots [lo, hi) of the buffers (bound once, reused)."""
        cache = self._views.get((lo, hi))
        if cache is None:
            cache = self.session.bind_buffers(tuple(b[lo:hi] for b in self.buffers))
            self._views[(lo, hi)] = cache
        return dataclasses.replace(cache, length=length)

    def prefill(self, active: _Active, ids: np.ndarray) -> np.ndarray:
        slot, start = active.slot, active.prefilled
        cache = self.scratch.pop(slot, None)
        if cache is None:
            cache = self.session.empty_cache(1, capacity=active.prompt_length)
        end = start + len(ids)
        mask = np.ones((1, end), dtype=np.int64)
        positions = np.arange(start, end, dtype=np.int64)[None]
        logits, cache = self.session.run(ids[None], mask, positions, cache)
        if end < active.prompt_length:
            self.scratch[slot] = cache
        else:
            self._join(slot, cache)
        chunk: np.ndarray = logits[0]
        return chunk

    def _join(self, slot: int, prompt: KVCache) -> None:
        """Copy a prefilled prompt into the columns just before ``column``; it decodes next."""
        length = prompt.length
        if self.column < length:  # too early in the timeline: skip ahead (others get holes)
            self.column = length
        begin = self.column - length
        for buffer, part in zip(self.buffers, prompt.values, strict=True):
            buffer[slot, :, begin : self.column] = part[0, :, :length]
        self.valid[slot] = 0
        self.valid[slot, begin : self.column] = 1

    def decode(self, rows: list[_Active]) -> np.ndarray:
        # Attention runs over every column up to `column`, holes included: compact when the
        # buffer is full, or when holes are most of the timeline (a copy of the live columns,
        # about once per live length of steps, against attention over dead columns every step).
        longest = int(self.valid.sum(axis=1).max())
        if self.column + 1 > self.capacity or self.column > 2 * longest + HOLE_SLACK:
            self._compact()
        column = self.column
        hi = max(a.slot for a in rows) + 1
        ids = np.zeros((hi, 1), dtype=np.int64)
        positions = np.zeros((hi, 1), dtype=np.int64)
        mask = self.valid[:hi, : column + 1].copy()
        live = np.zeros(hi, dtype=bool)
        for a in rows:
            live[a.slot] = True
            ids[a.slot, 0] = a.pending
            positions[a.slot, 0] = len(a.tokens) - 1
            self.valid[a.slot, column] = 1
        mask[:, column] = 1  # dummies (free or prefilling slots) see only their own column
        mask[~live, :column] = 0
        logits, _ = self.session.run(ids, mask, positions, self._view(0, hi, column))
        self.column += 1
        return logits[[a.slot for a in rows], -1, :]

    def release(self, active: _Active) -> None:
        self.valid[active.slot] = 0
        self.scratch.pop(active.slot, None)
        if not self.valid.any():
            self.column = 0  # nobody left: the timeline starts over

    def _compact(self) -> None:
        """Move every slot's columns to the left, right-aligned at the longest; drop holes."""
        self.compactions += 1
        spans = {
            slot: np.flatnonzero(self.valid[slot])
            for slot in range(self.valid.shape[0])
            if self.valid[slot].any()
        }
        end = max((len(c) for c in spans.values()), default=0)
        for slot, columns in spans.items():
            new = np.arange(end - len(columns), end)
            for buffer in self.buffers:
                buffer[slot, :, new] = buffer[slot, :, columns]
            self.valid[slot] = 0
            self.valid[slot, new] = 1
        self.column = end


class _Stacked:
    """Concatenating caches: running rows stacked, left-padded, rebuilt when membership changes."""

    def __init__(self, session: OnnxSession) -> None:
        self.session = session
        self.own: dict[int, KVCache] = {}  # a prefilling request's own cache, by request id
        self.rows: list[int] = []  # ids of the requests in the stack, in order
        self.stack: KVCache | None = None
        self.mask = np.zeros((0, 0), dtype=np.int64)

    def prefill(self, active: _Active, ids: np.ndarray) -> np.ndarray:
        key = active.request.id
        cache = self.own.get(key) or self.session.empty_cache(1)
        end = active.prefilled + len(ids)
        mask = np.ones((1, end), dtype=np.int64)
        positions = np.arange(active.prefilled, end, dtype=np.int64)[None]
        logits, cache = self.session.run(ids[None], mask, positions, cache)
        self.own[key] = cache
        chunk: np.ndarray = logits[0]
        return chunk

    def decode(self, rows: list[_Active]) -> np.ndarray:
        keys = [a.request.id for a in rows]
        if keys != self.rows:
            self._restack(keys)
        assert self.stack is not None
        self.mask = np.concatenate([self.mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
        ids = np.array([[a.pending] for a in rows], dtype=np.int64)
        positions = np.array([[len(a.tokens) - 1] for a in rows], dtype=np.int64)
        logits, self.stack = self.session.run(ids, self.mask, positions, self.stack)
        return logits[:, -1, :]

    def release(self, active: _Active) -> None:
        self.own.pop(active.request.id, None)

    def _restack(self, keys: list[int]) -> None:
        """One stacked cache for ``keys``: kept rows and newly prefilled ones, left-padded."""
        old = {key: b for b, key in enumerate(self.rows)}
        per_row: list[tuple[list[np.ndarray], int]] = []  # (layers [1, nh, L, hs], length)
        for key in keys:
            if key in old and self.stack is not None:
                b = old[key]
                length = int(self.mask[b].sum())
                layers = [_host(v)[b : b + 1, :, -length:] for v in self.stack.values]
            else:
                cache = self.own.pop(key)
                length = cache.length
                layers = [_host(v) for v in cache.values]
            per_row.append((layers, length))
        width = max(length for _, length in per_row)
        mask = np.zeros((len(keys), width), dtype=np.int64)
        values = []
        for layer in range(len(per_row[0][0])):
            first = per_row[0][0][layer]
            shape = (len(keys), first.shape[1], width, first.shape[3])
            stacked = np.zeros(shape, dtype=first.dtype)
            for b, (layers, length) in enumerate(per_row):
                stacked[b, :, width - length :] = layers[layer][0, :, -length:]
            values.append(stacked)
        for b, (_, length) in enumerate(per_row):
            mask[b, width - length :] = 1
        self.rows = keys
        self.stack = KVCache(tuple(values), width)
        self.mask = mask


def _host(value: object) -> np.ndarray:
    """A cache tensor as numpy (OrtValues come back from IO-bound runs)."""
    if isinstance(value, np.ndarray):
        return value
    numpy = getattr(value, "numpy", None)
    if numpy is None:
        raise TypeError(f"unexpected cache value {type(value).__name__}")
    array: np.ndarray = numpy()
    return array
