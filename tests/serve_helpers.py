"""Shared by tests/test_serve*.py: the tiny model they serve, and a real uvicorn server.

The model is a tiny in-place export (``export_tiny(kv_cache="inplace")``, made once per session),
or ``$GPTKIT_TEST_MODEL`` where CI provides a prebuilt file. The server is uvicorn itself, run in
a thread on a free loopback port, so the tests talk HTTP to exactly what ``gptkit serve`` runs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from runtime_helpers import ENV_MODEL, export_tiny

_MODEL: dict[str, Path] = {}
START_TIMEOUT = 120.0  # seconds for the server to answer /health 200 (the model loads first)


def serve_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model file the serve tests use (exported once per session)."""
    if "path" not in _MODEL:
        prebuilt = os.environ.get(ENV_MODEL)
        if prebuilt:
            _MODEL["path"] = Path(prebuilt)
        else:
            directory = tmp_path_factory.mktemp("serve-model")
            _MODEL["path"] = export_tiny(directory, kv_cache="inplace").path
    return _MODEL["path"]


@dataclass
class LiveServer:
    app: Any
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kwargs})


@contextmanager
def live_server(app: Any, *, wait_ready: bool = True) -> Iterator[LiveServer]:
    """Run ``app`` under uvicorn on a free loopback port; stop it (gracefully) afterwards."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(app, server, thread, port)
    try:
        if wait_ready:
            wait_healthy(live)
        yield live
    finally:
        server.should_exit = True
        thread.join(60)


def wait_healthy(live: LiveServer, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    with live.client() as client:
        while client.get("/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("/health did not answer 200")
            time.sleep(0.05)


def sse_data(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (comments and blank lines skipped)."""
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def sse_json(body: str) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body (everything but the final ``[DONE]``)."""
    data = sse_data(body)
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_idle(live: LiveServer, timeout: float = 30.0) -> None:
    """Until the engine has no running or waiting request and no busy slot (via /metrics)."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {live.app.state.gptkit.options.api_key}"}
    with live.client(headers=headers) as client:
        while True:
            text = client.get("/metrics").text
            busy = [
                metric(text, f"gptkit_{n}")
                for n in ("busy_slots", "requests_running", "requests_waiting")
            ]
            if busy == [0, 0, 0]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine is still busy: {busy}")
            time.sleep(0.05)
