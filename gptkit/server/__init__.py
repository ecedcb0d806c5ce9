"""gptkit's OpenAI-compatible HTTP server (``gptkit serve``; needs the ``serve`` extra).

``create_app(engine, ServerOptions(...))`` gives the ASGI app; see :mod:`gptkit.server.app`.
"""

from __future__ import annotations

from gptkit.server.app import create_app
from gptkit.server.options import ServerOptions

__all__ = ["ServerOptions", "create_app"]
