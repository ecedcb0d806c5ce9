"""`gptkit serve`: the command line, and the HTTP layer checked raw with httpx.

What a plain HTTP client sees: the OpenAI error envelope on every error (400, 401, 404, 405, 413,
429, 503, 500 without a traceback), SSE framing with ``[DONE]`` last, /health while loading and
draining, /metrics, /tokenize and /detokenize, CORS headers only with --cors-origin. The OpenAI
client's view is tests/test_serve_openai.py; the load test is tests/test_serve_load.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, live_server, metric, serve_model, sse_data, sse_json

from gptkit.cli import cli
from gptkit.serve_cmd import MISSING_EXTRA
from gptkit.server import ServerOptions, create_app
from runtime.engine import Engine

KEY = "test-key-123"
NAME = "tiny"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serve_model(tmp_path_factory)


@pytest.fixture(scope="module")
def live(model_path: Path) -> Iterator[LiveServer]:
    """A server with an API key and CORS for one origin."""
    app = create_app(
        lambda: Engine.load(model_path, threads=1, max_batch=4),
        ServerOptions(model_name=NAME, api_key=KEY, cors_origins=("http://example.test",)),
    )
    with live_server(app) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[object]:
    with live.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def envelope(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# ---- the command line -------------------------------------------------------------------------


def test_serve_help_lists_the_flags(runner) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--max-batch",
        "--max-queue",
        "--threads",
        "--model-name",
        "--cors-origin",
        "--device",
        "--drain-timeout",
        "--max-body",
    ):
        assert flag in result.output


def test_missing_model_file_is_one_line(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(cli, ["serve", str(tmp_path / "nope.onnx")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "nope.onnx" in lines[0]


def test_missing_serve_extra_is_one_line(runner, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sse_starlette" else real(name, *a),
    )
    result = runner.invoke(cli, ["serve", str(tmp_path / "model.onnx")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {MISSING_EXTRA}"


def test_bad_flag_values_are_usage_errors(runner) -> None:  # type: ignore[no-untyped-def]
    for args in (["--max-batch", "0"], ["--port", "70000"], ["--device", "tpu"]):
        result = runner.invoke(cli, ["serve", *args])
        assert result.exit_code == 2, args


# ---- routes and errors ------------------------------------------------------------------------


def test_health_is_open_and_everything_else_needs_the_key(live: LiveServer) -> None:
    with live.client() as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok"}
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/tokenize")):
            response = anonymous.request(method, path, json={"content": "x"})
            assert response.status_code == 401, path
            assert envelope(response)["code"] == "invalid_api_key"
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert "invalid API key" in envelope(wrong)["message"]


def test_models(client) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [NAME]
    assert body["data"][0]["max_model_len"] == 64
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    assert client.get("/v1/models/gpt-4").status_code == 404


def test_completion_raw_shape(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/completions",
        json={"model": NAME, "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == NAME
    assert body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 5


def test_stream_framing(client) -> None:  # type: ignore[no-untyped-def]
    payload = {
        "model": NAME,
        "prompt": "ROMEO:",
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = client.post("/v1/completions", json=payload)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = sse_data(response.text)
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = sse_json(response.text)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    whole = client.post(
        "/v1/completions", json={**payload, "stream": False, "stream_options": None}
    )
    assert whole.json()["choices"][0]["text"] == text
    assert whole.json()["usage"] == usage["usage"]


def test_chat_stream_starts_with_the_role(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": NAME,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4,
            "stream": True,
        },
    )
    chunks = sse_json(response.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(
    ("payload", "param", "fragment"),
    [
        ({"prompt": "x", "foo": 1}, "foo", "foo"),
        ({"prompt": "x", "best_of": 3}, "best_of", "best_of"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "suffix"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo", "echo"),
        ({"prompt": "x", "temperature": 5}, "temperature", "temperature"),
        ({"prompt": "x", "logprobs": 9}, "logprobs", "logprobs"),
        ({"prompt": [99999]}, "prompt", "99999"),
        ({"prompt": "x", "stop": ""}, "stop", "stop"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "abc"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens"),
        ({}, "prompt", "prompt"),
    ],
)
def test_bad_fields_are_400_naming_them(client, payload, param, fragment) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/completions", json={"model": NAME, **payload})
    assert response.status_code == 400, response.text
    error = envelope(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]


def test_context_length_exceeded(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/completions", json={"model": NAME, "prompt": "ROMEO:", "max_tokens": 100}
    )
    assert response.status_code == 400
    error = envelope(response)
    assert error["code"] == "context_length_exceeded"
    assert "64" in error["message"] and "100" in error["message"]


def test_malformed_json_and_non_objects(client) -> None:  # type: ignore[no-untyped-def]
    for body in (b"{not json", b"[1, 2]", b"", '"caf\u00e9'.encode()):
        response = client.post(
            "/v1/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, body
        envelope(response)


def test_unknown_model_is_404(client) -> None:  # type: ignore[no-untyped-def]
    for route, extra in (
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ):
        response = client.post(route, json={"model": "gpt-4", **extra})
        assert response.status_code == 404
        assert envelope(response)["code"] == "model_not_found"


def test_model_may_be_left_out(client) -> None:  # type: ignore[no-untyped-def]
    """As with llama.cpp's server and vLLM: curl users need not know the served name."""
    payload = {"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0}
    named = client.post("/v1/completions", json={"model": NAME, **payload}).json()
    unnamed = client.post("/v1/completions", json=payload)
    assert unnamed.status_code == 200
    assert unnamed.json()["choices"][0]["text"] == named["choices"][0]["text"]
    assert unnamed.json()["model"] == NAME


def test_unknown_route_and_method(client) -> None:  # type: ignore[no-untyped-def]
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404
    envelope(missing)
    wrong_method = client.get("/v1/completions")
    assert wrong_method.status_code == 405
    envelope(wrong_method)


def test_body_over_the_limit_is_413(client) -> None:  # type: ignore[no-untyped-def]
    big = json.dumps({"model": NAME, "prompt": "x" * (1 << 20)}).encode()
    response = client.post("/v1/completions", content=big)
    assert response.status_code == 413
    assert envelope(response)["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the size is counted as it arrives
        for _ in range(40):
            yield b" " * 65536

    streamed = client.post("/v1/completions", content=chunks())
    assert streamed.status_code == 413


def test_tokenize_and_detokenize(client, model_path: Path) -> None:  # type: ignore[no-untyped-def]
    import runtime

    tokenizer = runtime.load(model_path).tokenizer
    text = "To be, or not to be"
    tokens = client.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens == tokenizer.encode(text)
    assert client.post("/tokenize", json={"prompt": text}).json()["tokens"] == tokens
    assert client.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
    bad = client.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and envelope(bad)["param"] == "tokens"


def test_metrics(client) -> None:  # type: ignore[no-untyped-def]
    client.post("/v1/completions", json={"model": NAME, "prompt": "ROMEO:", "max_tokens": 3})
    text = client.get("/metrics").text
    assert 'gptkit_requests_total{route="/v1/completions",status="200"}' in text
    for name in (
        "gptkit_prompt_tokens_total",
        "gptkit_generation_tokens_total",
        "gptkit_time_to_first_token_seconds_count",
        "gptkit_inter_token_latency_seconds_count",
    ):
        assert metric(text, name) > 0, name
    assert metric(text, "gptkit_slots") == 4
    for gauge in ("gptkit_busy_slots", "gptkit_requests_running", "gptkit_requests_waiting"):
        assert metric(text, gauge) >= 0


def test_cors_only_with_an_origin(live: LiveServer, model_path: Path) -> None:
    origin = {"Origin": "http://example.test"}
    with live.client() as c:
        assert c.get("/health", headers=origin).headers["access-control-allow-origin"] == (
            "http://example.test"
        )
        preflight = c.options(
            "/v1/completions",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
    plain = create_app(lambda: Engine.load(model_path, threads=1), ServerOptions(model_name=NAME))
    with live_server(plain) as other, other.client() as c:
        response = c.get("/health", headers=origin)
        assert response.status_code == 200
        assert not any(h.startswith("access-control-") for h in response.headers)


def test_playground_page(live: LiveServer) -> None:
    with live.client() as c:  # the static page needs no key; its API calls do
        response = c.get("/")
    assert response.status_code in (200, 404)
    assert response.headers["content-type"].startswith("text/html")


# ---- loading, draining, failures --------------------------------------------------------------


def test_health_503_while_loading_then_200(model_path: Path) -> None:
    release = threading.Event()

    def slow_load() -> Engine:
        release.wait(60)
        return Engine.load(model_path, threads=1)

    app = create_app(slow_load, ServerOptions(model_name=NAME))
    with live_server(app, wait_ready=False) as server, server.client() as c:
        loading = c.get("/health")
        assert loading.status_code == 503 and envelope(loading)["code"] == "loading"
        busy = c.post("/v1/completions", json={"model": NAME, "prompt": "x"})
        assert busy.status_code == 503
        release.set()
        from serve_helpers import wait_healthy

        wait_healthy(server)
        assert c.get("/health").status_code == 200


def test_draining_refuses_new_requests(model_path: Path) -> None:
    app = create_app(lambda: Engine.load(model_path, threads=1), ServerOptions(model_name=NAME))
    with live_server(app) as server, server.client() as c:
        app.state.gptkit.begin_drain()
        assert c.get("/health").status_code == 503
        refused = c.post("/v1/completions", json={"model": NAME, "prompt": "x"})
        assert refused.status_code == 503
        assert envelope(refused)["code"] == "shutting_down"


def test_queue_full_is_429_and_cancels_the_rest(model_path: Path) -> None:
    app = create_app(
        lambda: Engine.load(model_path, threads=1, max_batch=1, max_queue=2),
        ServerOptions(model_name=NAME),
    )
    with live_server(app) as server, server.client() as c:
        response = c.post(
            "/v1/completions", json={"model": NAME, "prompt": "x", "n": 20, "max_tokens": 40}
        )
        assert response.status_code == 429
        assert envelope(response)["code"] == "queue_full"
        from serve_helpers import wait_idle

        wait_idle(server)


class _Exploding:
    """An engine whose submit fails unexpectedly (a bug): the client sees a generic 500."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def submit(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail /home/someone/model.onnx")


def test_unexpected_errors_are_500_without_details(model_path: Path) -> None:
    app = create_app(
        lambda: _Exploding(Engine.load(model_path, threads=1)),  # type: ignore[arg-type, return-value]
        ServerOptions(model_name=NAME),
    )
    with live_server(app) as server, server.client() as c:
        response = c.post("/v1/completions", json={"model": NAME, "prompt": "x"})
        assert response.status_code == 500
        error = envelope(response)
        assert "secret" not in response.text and "Traceback" not in response.text
        assert error["type"] == "server_error"


class _Slow:
    """An engine whose every event takes 20 ms on the engine thread (a long generation), and
    which keeps its requests so a test can see how they ended."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.requests: list[object] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def submit(self, prompt_ids, config, *, on_event=None, **kwargs):  # type: ignore[no-untyped-def]
        def slow(event) -> None:  # type: ignore[no-untyped-def]
            time.sleep(0.02)
            on_event(event)

        request = self._engine.submit(prompt_ids, config, on_event=slow, **kwargs)
        self.requests.append(request)
        return request


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_cancels_its_request(model_path: Path, stream: bool) -> None:
    slow = _Slow(Engine.load(model_path, threads=1))
    app = create_app(slow, ServerOptions(model_name=NAME))  # type: ignore[arg-type]
    payload = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 50, "stream": stream}
    with live_server(app) as server:
        with server.client(timeout=httpx.Timeout(60, read=0.5)) as c:
            if stream:
                with c.stream("POST", "/v1/completions", json=payload) as response:
                    assert response.status_code == 200
                    next(line for line in response.iter_lines() if line.startswith("data: "))
            else:
                with pytest.raises(httpx.ReadTimeout):
                    c.post("/v1/completions", json=payload)
        (request,) = slow.requests
        request.result(timeout=30)  # type: ignore[attr-defined]
        assert request.finish_reason == "cancelled"  # type: ignore[attr-defined]
        assert len(request.token_ids) < 50  # type: ignore[attr-defined]
        from serve_helpers import wait_idle

        wait_idle(server)


@pytest.mark.slow
def test_sigterm_drains_and_exits_0(model_path: Path, tmp_path: Path) -> None:
    """`gptkit serve` as a process: SIGTERM lets a running stream finish, then exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "gptkit", "serve", str(model_path), "--port", str(port)]
    command += ["--model-name", NAME, "--threads", "1", "--drain-timeout", "20"]
    env = {**os.environ, "GPTKIT_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(0.1)
        payload = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 50, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert [line for line in rest if line.startswith("data: ")][-1] == "data: [DONE]"
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = process.stdout.read().decode() if process.stdout else ""
    assert "Traceback" not in output


def test_serve_help_imports_no_server_stack() -> None:
    """`gptkit serve --help` answers without fastapi, uvicorn or onnxruntime (fresh process)."""
    code = (
        "import contextlib, io, sys\n"
        "from gptkit.cli import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['serve', '--help'], prog_name='gptkit', standalone_mode=False)\n"
        "heavy = ('fastapi', 'uvicorn', 'sse_starlette', 'prometheus_client', 'onnxruntime')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
