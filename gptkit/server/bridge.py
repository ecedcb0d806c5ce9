"""From the engine's thread to asyncio: the requests of one HTTP call as one stream of events.

The engine calls ``on_event`` on its own thread; the callback only hands the event to the event
loop (``loop.call_soon_threadsafe(queue.put_nowait, ...)``), so it is quick and never raises.
One :class:`Generation` holds every engine request of one HTTP call (prompts x n choices), merges
their events into one queue in arrival order, records the token metrics, and cancels whatever is
still running when the call ends early (a client that went away, an error).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from gptkit.server.errors import APIError
from gptkit.server.metrics import Metrics
from runtime.errors import (
    ConfigError,
    ContextLengthError,
    EngineClosedError,
    GenerationError,
    QueueFullError,
)

if TYPE_CHECKING:
    from runtime.engine import Engine, Event, Request
    from runtime.sampling import SamplingConfig


class Generation:
    """The engine requests of one HTTP call; iterate :meth:`events` once."""

    def __init__(self, engine: Engine, metrics: Metrics, *, param: str = "prompt") -> None:
        self._engine = engine
        self._metrics = metrics
        self._param = param  # the request field a context error names
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Event, float]] = asyncio.Queue()
        self.requests: list[Request] = []
        self.started = time.perf_counter()
        self._last: dict[int, float] = {}
        self._open = 0

    def submit(
        self,
        prompt_ids: Sequence[int],
        config: SamplingConfig,
        *,
        top_logprobs: int | None,
        seed_row: int,
    ) -> int:
        """Queue one choice; returns its index. Engine refusals become :class:`APIError`."""
        index = len(self.requests)
        loop, queue = self._loop, self._queue

        def on_event(event: Event) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event, time.perf_counter()))
            except RuntimeError:  # the loop is closed: the server is gone, nobody listens
                pass

        try:
            request = self._engine.submit(
                prompt_ids,
                config,
                top_logprobs=top_logprobs,
                seed_row=seed_row,
                on_event=on_event,
            )
        except BaseException as e:
            self.cancel()
            raise engine_error(e, self._param) from None
        self.requests.append(request)
        self._open += 1
        if seed_row == 0:  # each prompt once, however many choices it has
            self._metrics.prompt_tokens.inc(request.prompt_tokens)
        return index

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has its final event."""
        while self._open:
            index, event, at = await self._queue.get()
            if event.token_id is not None:
                self._metrics.generation_tokens.inc()
                last = self._last.get(index)
                if last is None:
                    self._metrics.time_to_first_token.observe(at - self.started)
                else:
                    self._metrics.inter_token_latency.observe(at - last)
                self._last[index] = at
            if event.finish_reason is not None:
                self._open -= 1
                if event.finish_reason not in ("cancelled", "error"):
                    self._metrics.request_duration.observe(at - self.started)
            yield index, event

    def cancel(self) -> None:
        """Cancel every request that has not finished (each frees its slot within one step)."""
        for request in self.requests:
            if request.finish_reason is None:
                request.cancel()


def engine_error(error: BaseException, param: str = "prompt") -> BaseException:
    """The client's view of an engine refusal; other exceptions are returned unchanged."""
    if isinstance(error, ContextLengthError):
        prompt = getattr(error, "prompt_tokens", None)
        new = getattr(error, "max_new_tokens", None)
        context = getattr(error, "context", None)
        if prompt is not None and context is not None:
            asked = prompt + (new or 1)
            message = (
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {asked} tokens ({prompt} in the prompt, {new or 1} for the "
                "completion). Please reduce the prompt or the completion length."
            )
        else:
            message = str(error)
        return APIError(400, message, param=param, code="context_length_exceeded")
    if isinstance(error, QueueFullError):
        return APIError(
            429,
            "the server's queue is full; retry later",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(error, EngineClosedError):
        return APIError(503, "the server is shutting down", code="shutting_down")
    if isinstance(error, ConfigError):  # a sampling value SamplingConfig refused
        head = str(error).split(" ", 1)[0]
        field = {"max_new_tokens": "max_tokens"}.get(head, head)
        return APIError(400, str(error), param=field if field in SAMPLING_FIELDS else None)
    if isinstance(error, GenerationError):
        return APIError(400, str(error), param=param)
    return error


SAMPLING_FIELDS = frozenset(
    "max_tokens temperature top_k top_p min_p repetition_penalty seed stop presence_penalty "
    "frequency_penalty logit_bias".split()
)


def error_event(error: APIError | None = None) -> dict[str, Any]:
    """What a stream sends instead of its next chunk when it cannot go on."""
    if error is None:
        error = APIError(500, "generation failed; see the server's log")
    return error.body()
