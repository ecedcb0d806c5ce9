"""A bounded load test: 16 concurrent clients against one server on the tiny model.

Streams read to the end, streams dropped after their first chunk, non-stream completions and
chats, malformed JSON, an oversized body and a wrong key, all at once and twice over. Every
accepted request ends with a whole response or an error event, nothing answers 5xx, the slots
are all free again afterwards, and /health still answers 200.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, live_server, serve_model, sse_data, wait_idle

from gptkit.server import ServerOptions, create_app
from runtime.engine import Engine

KEY = "load-key"
NAME = "tiny"
CLIENTS = 16
ROUNDS = 2


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    path: Path = serve_model(tmp_path_factory)
    app = create_app(
        lambda: Engine.load(path, threads=1, max_batch=4, max_queue=64),
        ServerOptions(model_name=NAME, api_key=KEY, max_body=64 * 1024),
    )
    with live_server(app) as server:
        yield server


def _stream_whole(c: httpx.Client, route: str, payload: dict) -> None:  # type: ignore[type-arg]
    with c.stream("POST", route, json={**payload, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        body = "".join(response.iter_text())
    data = sse_data(body)
    assert data[-1] == "[DONE]", data[-2:]
    chunks = [json.loads(d) for d in data[:-1]]
    if any("error" in c for c in chunks):  # an error event is a proper end too
        return
    finished = {ch["index"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")}
    assert finished == set(range(payload.get("n", 1)))


def _stream_dropped(c: httpx.Client, route: str, payload: dict) -> None:  # type: ignore[type-arg]
    with c.stream("POST", route, json={**payload, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave mid-stream: the server must cancel and free the slot


def _whole(c: httpx.Client, route: str, payload: dict) -> None:  # type: ignore[type-arg]
    response = c.post(route, json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["choices"]) == payload.get("n", 1) and body["usage"]["total_tokens"] > 0


def _malformed(c: httpx.Client) -> None:
    response = c.post("/v1/completions", content=b'{"model": "tiny", "prompt": ')
    assert response.status_code == 400 and "error" in response.json()


def _oversized(c: httpx.Client) -> None:
    response = c.post("/v1/completions", json={"model": NAME, "prompt": "x" * 100_000})
    assert response.status_code == 413 and "error" in response.json()


def _wrong_key(c: httpx.Client) -> None:
    response = c.post(
        "/v1/completions",
        json={"model": NAME, "prompt": "x"},
        headers={"Authorization": "Bearer nope"},
    )
    assert response.status_code == 401 and "error" in response.json()


COMPLETION = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 40}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 30}


def _jobs() -> list[Callable[[httpx.Client], None]]:
    jobs: list[Callable[[httpx.Client], None]] = []
    jobs += [lambda c: _stream_whole(c, "/v1/completions", COMPLETION)] * 4
    jobs += [lambda c: _stream_whole(c, "/v1/completions", {**COMPLETION, "n": 2, "seed": 1})]
    jobs += [lambda c: _stream_whole(c, "/v1/chat/completions", CHAT)]
    jobs += [lambda c: _stream_dropped(c, "/v1/completions", COMPLETION)] * 3
    jobs += [lambda c: _stream_dropped(c, "/v1/chat/completions", CHAT)]
    jobs += [lambda c: _whole(c, "/v1/completions", COMPLETION)]
    jobs += [lambda c: _whole(c, "/v1/chat/completions", {**CHAT, "n": 2})]
    jobs += [_malformed, _oversized, _wrong_key]
    jobs += [lambda c: _whole(c, "/v1/completions", {**COMPLETION, "logprobs": 2})]
    assert len(jobs) == CLIENTS
    return jobs


def test_sixteen_clients_at_once(live: LiveServer) -> None:
    start = threading.Barrier(CLIENTS)
    failures: list[str] = []

    def client(job: Callable[[httpx.Client], None]) -> None:
        try:
            with live.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
                start.wait(60)
                for _ in range(ROUNDS):
                    job(c)
        except BaseException as e:  # collected, reported below with every other failure
            failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(job,)) for job in _jobs()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert failures == []

    wait_idle(live)  # every slot free again, nothing waiting
    with live.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert c.get("/health").status_code == 200
        metrics = c.get("/metrics").text
    statuses = re.findall(r'gptkit_requests_total\{route="[^"]*",status="(\d+)"\}', metrics)
    assert statuses and not [s for s in statuses if s.startswith("5")], statuses
    # and the server still serves
    with live.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        _whole(c, "/v1/completions", COMPLETION)
