"""What the server is told at startup (the ``gptkit serve`` flags that are not the engine's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON: plenty for any prompt that fits a context
DEFAULT_DRAIN_TIMEOUT = 30.0
PLAYGROUND = Path(__file__).resolve().parent / "static" / "playground.html"


@dataclass(frozen=True)
class ServerOptions:
    """How the HTTP layer behaves; the engine (slots, queue, threads) is configured on its own.

    model_name: the name clients must send in ``model`` (and ``/v1/models`` lists).
    api_key: when set, every route but ``/health`` and the playground page needs
    ``Authorization: Bearer <api_key>``.
    cors_origins: origins allowed by CORS; empty means no CORS headers at all.
    max_body: the largest request body in bytes (413 above it).
    drain_timeout: on shutdown, how long requests in flight may run before they are cancelled.
    on_load_error: called (on the loading thread) when the engine fails to load; the CLI stops
    the server there. Without it the error is logged and ``/health`` keeps answering 503.
    """

    model_name: str = "model"
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body: int = DEFAULT_MAX_BODY
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    playground: Path = PLAYGROUND
    on_load_error: Callable[[BaseException], None] | None = None
