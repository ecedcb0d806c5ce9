"""`gptkit serve --ray`: the server as Ray Serve replicas, driven through Ray Serve's HTTP proxy.

One `gptkit serve MODEL --ray --replicas 2` process for the module (a local Ray cluster it starts
itself; its HTTP proxy on a free loopback port), as a user runs it. Through the proxy, with the
official `openai` client and raw httpx:

* the same greedy text as ``runtime.load(path).generate(temperature=0)``;
* concurrent streams land on both replicas (the ``x-gptkit-replica`` header, and each replica's
  own /metrics, told apart by that header);
* a client that goes away cancels its work in the replica (stream and not);
* a replica's process SIGKILLed in the middle of the load: every request completes or fails
  visibly (no hang: client timeouts; no silent cut: a stream that ends has a finish_reason and
  ``[DONE]``), Ray starts a new replica (2 replica processes again, a new id answering), and
  requests after it succeed;
* SIGTERM stops Serve and Ray and the command exits 0.
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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_helpers import serve_model

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAS_RAY, reason="the ray extra is not installed (pip install 'gptkit[ray]')"
)

NAME = "tiny"
KEY = "ray-test-key"
HEADER = "x-gptkit-replica"
REPLICA_TITLE = "ray::ServeReplica:gptkit:gptkit"  # the process title Ray gives a replica
START_TIMEOUT = 240.0  # a local Ray cluster and two replicas on two busy cores
MAX_BATCH = 4
CANCEL_N, CANCEL_TOKENS = 64, 58
STREAM_N = 6  # choices per stream in the kill test: each stream lasts a while  # a long request: 64 choices x 58 tokens (context 64)


@dataclass
class Cluster:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    model: Path
    eot: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, **{"timeout": 30, **kwargs})

    def openai(self, **kwargs: Any) -> Any:
        options = {"max_retries": 0, "timeout": 30.0, **kwargs}
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, **options)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live process under ``root`` (from /proc)."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":  # a zombie is dead
            continue
        parents[int(entry)] = int(fields[1])
        commands[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def busiest_replica(cluster: Cluster, window: float = 0.3) -> int:
    """The replica process that used more CPU over ``window`` seconds (it is serving)."""

    def cpu(pid: int) -> int:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    pids = sorted(replica_processes(cluster))
    assert len(pids) == 2, pids
    first = {pid: cpu(pid) for pid in pids}
    time.sleep(window)
    return max(pids, key=lambda pid: cpu(pid) - first[pid])


def replica_processes(cluster: Cluster) -> set[int]:
    tree = _descendants(cluster.process.pid)
    return {pid for pid, command in tree.items() if command.startswith(REPLICA_TITLE)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import runtime

    model = serve_model(tmp_path_factory)
    directory = tmp_path_factory.mktemp("ray")
    log = directory / "serve.log"
    port = _free_port()
    command = [sys.executable, "-m", "gptkit", "serve", str(model), "--ray", "--replicas", "2"]
    command += ["--threads", "1", "--max-batch", str(MAX_BATCH), "--port", str(port)]
    command += ["--model-name", NAME, "--api-key", KEY, "--drain-timeout", "10"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster
    env["GPTKIT_CACHE_DIR"] = str(directory / "cache")
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    cluster = Cluster(process, port, log, model, runtime.load(model).tokenizer.eot_token)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:  # serve.run has returned (every replica is up), and the proxy answers
                ready = f"on http://127.0.0.1:{port}" in cluster.output()
                if ready and httpx.get(f"{cluster.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"gptkit serve --ray did not come up:\n{cluster.output()[-4000:]}")
            time.sleep(0.5)
        while len(replica_processes(cluster)) != 2:
            assert time.monotonic() < deadline, replica_processes(cluster)
            time.sleep(0.2)
        yield cluster
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the whole session: Ray's processes too
                process.wait()


def _metrics(text: str) -> dict[str, float]:
    """Unlabelled gptkit samples of a Prometheus text."""
    values = {}
    for line in text.splitlines():
        if line.startswith("gptkit_") and "{" not in line:
            name, value = line.split()[:2]
            values[name] = float(value)
    return values


def replica_metrics(cluster: Cluster, want: int = 2, timeout: float = 30.0) -> dict[str, dict]:
    """Each replica's own /metrics (the proxy picks the replica; the header says which), until
    ``want`` replicas have answered."""
    seen: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + timeout
    with cluster.client() as c:
        while len(seen) < want:
            response = c.get("/metrics")
            assert response.status_code == 200
            seen[response.headers[HEADER]] = _metrics(response.text)
            assert time.monotonic() < deadline, f"only {sorted(seen)} answered /metrics"
    return seen


def wait_all_idle(cluster: Cluster, timeout: float = 30.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        seen = replica_metrics(cluster)
        busy = {
            rid: [
                m["gptkit_busy_slots"],
                m["gptkit_requests_running"],
                m["gptkit_requests_waiting"],
            ]
            for rid, m in seen.items()
        }
        if all(v == [0, 0, 0] for v in busy.values()):
            return seen
        assert time.monotonic() < deadline, f"replicas still busy: {busy}"
        time.sleep(0.2)


# ---- the tests (in file order: the kill and SIGTERM come last) --------------------------------


@needs_ray
@pytest.mark.slow
def test_greedy_text_equals_the_runtime(cluster: Cluster) -> None:
    import runtime

    expected = runtime.load(cluster.model).generate("ROMEO:", temperature=0, max_new_tokens=20)
    with cluster.openai() as client:
        for _ in range(4):  # whichever replica answers
            completion = client.completions.create(
                model=NAME, prompt="ROMEO:", max_tokens=20, temperature=0
            )
            assert completion.choices[0].text == expected


@needs_ray
@pytest.mark.slow
def test_concurrent_streams_are_served_by_both_replicas(cluster: Cluster) -> None:
    before = replica_metrics(cluster)
    replicas: list[str] = []
    texts: list[str] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with cluster.openai() as client:
                raw = client.completions.with_raw_response.create(
                    model=NAME,
                    prompt=f"ROMEO {i}:",
                    max_tokens=30,
                    temperature=0,
                    stream=True,
                    logit_bias={str(cluster.eot): -100},
                )
                replicas.append(raw.headers[HEADER])
                chunks = list(raw.parse())
            assert chunks[-1].choices[0].finish_reason == "length"
            texts.append("".join(c.choices[0].text for c in chunks))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert not errors, errors
    assert len(texts) == 16
    assert set(replicas) == set(before), replicas  # both replicas served
    after = replica_metrics(cluster)
    for rid in before:  # and each one's own metrics counted its share
        served = replicas.count(rid)
        delta = after[rid]["gptkit_generation_tokens_total"]
        delta -= before[rid]["gptkit_generation_tokens_total"]
        assert delta >= 30 * served, (rid, served, delta)


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_cancels_its_work_in_the_replica(
    cluster: Cluster, stream: bool
) -> None:
    """64 choices of 58 tokens (3712 tokens, about a second of work): the client leaves after
    its first chunk (or 0.2 s); the replica cancels the rest and its slots are free again."""
    before = wait_all_idle(cluster)
    payload = {
        "model": NAME,
        "prompt": "ROMEO:",
        "max_tokens": CANCEL_TOKENS,
        "n": CANCEL_N,
        "stream": stream,
        "logit_bias": {str(cluster.eot): -100},  # never end early: all 3712 unless cancelled
    }
    with cluster.client(timeout=httpx.Timeout(30, read=0.2)) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json=payload) as response:
                assert response.status_code == 200
                next(line for line in response.iter_lines() if line.startswith("data: "))
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=payload)
    after = wait_all_idle(cluster)
    generated = sum(
        after[rid]["gptkit_generation_tokens_total"] - before[rid]["gptkit_generation_tokens_total"]
        for rid in before
    )
    assert 0 < generated < CANCEL_N * CANCEL_TOKENS * 0.7, generated


@dataclass
class Outcome:
    kind: str  # "ok", "error" (the client saw it), "cut" (ended silently), "hung"
    replica: str = ""
    sent_after_kill: bool = False
    detail: str = ""
    started: float = 0.0
    ended: float = 0.0


def _stream_raw(cluster: Cluster, i: int) -> Outcome:
    """One streaming request with httpx: [DONE] after a finish_reason, or an error."""
    payload = {
        "model": NAME,
        "prompt": f"ROMEO {i}:",
        "max_tokens": 40,
        "n": STREAM_N,
        "stream": True,
        "logit_bias": {str(cluster.eot): -100},
    }
    replica = ""
    try:
        with (
            cluster.client(timeout=httpx.Timeout(30)) as c,
            c.stream("POST", "/v1/completions", json=payload) as response,
        ):
            replica = response.headers.get(HEADER, "")
            if response.status_code != 200:
                return Outcome("error", replica, detail=f"HTTP {response.status_code}")
            data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as e:
        return Outcome("error", replica, detail=f"{type(e).__name__}: {e}")
    if not data or data[-1] != "[DONE]":
        return Outcome("cut", replica, detail=f"{len(data)} events, no [DONE]")
    chunks = [json.loads(d) for d in data[:-1]]
    if len({c.get("id") for c in chunks if "id" in c}) > 1:
        return Outcome("cut", replica, detail="chunks of two responses in one stream")
    if chunks and "error" in chunks[-1]:  # the server's own error event, then [DONE]
        return Outcome("error", replica, detail=chunks[-1]["error"]["message"])
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    if sorted(finished) != list(range(STREAM_N)):
        return Outcome("cut", replica, detail=f"[DONE] after finish_reasons of {finished}")
    return Outcome("ok", replica)


def _stream_openai(cluster: Cluster, i: int) -> Outcome:
    """One streaming request with the openai client: a finish_reason at the end, or it raises."""
    replica = ""  # known once the headers are in; a stream cut after them keeps it
    try:
        with cluster.openai() as client:
            raw = client.completions.with_raw_response.create(
                model=NAME,
                prompt=f"JULIET {i}:",
                max_tokens=40,
                n=STREAM_N,
                stream=True,
                logit_bias={str(cluster.eot): -100},
            )
            replica = raw.headers.get(HEADER, "")
            chunks = list(raw.parse())
    except openai.OpenAIError as e:
        return Outcome("error", replica, detail=f"{type(e).__name__}: {e}")
    except httpx.HTTPError as e:  # a broken stream surfaces as httpx's error
        return Outcome("error", replica, detail=f"{type(e).__name__}: {e}")
    if len({c.id for c in chunks}) > 1:
        return Outcome("cut", replica, detail="chunks of two responses in one stream")
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason == "length"]
    if sorted(finished) != list(range(STREAM_N)):
        return Outcome("cut", replica, detail=f"the end, with finish_reasons of {finished}")
    return Outcome("ok", replica)


@needs_ray
@pytest.mark.slow
def test_killing_a_replica_mid_load(cluster: Cluster) -> None:
    """SIGKILL one replica's process under 8 concurrent streaming clients.

    Streams here last ~0.2 s, so a kill can fall on a replica with none in flight; such a try
    tests nothing and is repeated (at most 3 tries) once Ray has replaced the replica.
    """
    for _ in range(3):
        hit, victim_id, after = _kill_a_replica_under_load(cluster)
        if hit:
            break
    assert hit, ("no stream met the killed replica", victim_id, after)

    # Requests sent now succeed, on both replicas.
    results: list[Outcome] = []
    fresh = [
        threading.Thread(
            target=lambda i=i: results.append(
                (_stream_openai if i % 2 else _stream_raw)(cluster, i)
            )
        )
        for i in range(8)
    ]
    for t in fresh:
        t.start()
    for t in fresh:
        t.join(60)
    assert [o.kind for o in results] == ["ok"] * 8, results


def _kill_a_replica_under_load(cluster: Cluster) -> tuple[list[Outcome], str, list[Outcome]]:
    """One try: SIGKILL the busier replica under load, check that nothing hung or was cut
    silently and that Ray replaced it; returns the streams that met the kill, the victim's id
    and every stream that ended after the kill."""
    outcomes: list[Outcome] = []
    killed = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(worker: int) -> None:
        i = 0
        while not stop.is_set():
            after = killed.is_set()
            send = _stream_openai if worker % 2 else _stream_raw
            started = time.monotonic()
            outcome = send(cluster, worker * 1000 + i)
            outcome.sent_after_kill = after
            outcome.started, outcome.ended = started, time.monotonic()
            with lock:
                outcomes.append(outcome)
            i += 1

    threads = [threading.Thread(target=client_loop, args=(w,), daemon=True) for w in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        # Both are serving, several streams each: a replica's CPU then is serving, not start-up
        # work (a kill chosen by start-up CPU once met no stream at all).
        while (
            len(served := Counter(o.replica for o in outcomes if o.kind == "ok")) < 2
            or min(served.values()) < 3
        ):
            assert time.monotonic() < deadline, [o.kind for o in outcomes]
            time.sleep(0.05)
        victim = busiest_replica(cluster, window=1.0)
        os.kill(victim, signal.SIGKILL)
        killed.set()
        killed_at = time.monotonic()
        time.sleep(5)  # the load goes on while Ray notices and replaces the replica
    finally:
        stop.set()
        for t in threads:
            t.join(60)  # every request has a 30 s client timeout
    assert not any(t.is_alive() for t in threads), "a client hung past its timeout"

    cut = [o for o in outcomes if o.kind == "cut"]
    assert not cut, cut  # none silently cut
    errors = [o for o in outcomes if o.kind == "error"]
    ok = [o for o in outcomes if o.kind == "ok"]
    assert ok, outcomes
    print(f"\n{len(ok)} streams completed, {len(errors)} failed visibly around the kill:")
    for o in errors:
        print(f"  [{o.replica or 'no replica header'}] {o.detail[:160]}")
    # The victim's id: the one that answered before the kill and never after the replacement.
    ids_before = {o.replica for o in ok if not o.sent_after_kill}

    # Ray brings the replica count back to 2: a new replica process, and its id answering.
    deadline = time.monotonic() + 120
    while True:
        alive = replica_processes(cluster)
        if len(alive) == 2 and victim not in alive:
            break
        assert time.monotonic() < deadline, f"replicas after the kill: {alive}"
        time.sleep(0.5)
    deadline = time.monotonic() + 120
    while True:
        try:
            seen = set(replica_metrics(cluster, timeout=10))
        except AssertionError:
            seen = set()
        if len(seen) == 2 and seen - ids_before:
            break
        assert time.monotonic() < deadline, f"replicas answering after the kill: {seen}"
        time.sleep(0.5)
    (victim_id,) = ids_before - seen
    # The kill met the load: streams on the victim ended after it (running at the kill, or routed
    # there before Ray noticed). A stream the kill cut names the victim if its headers came from
    # it; one the victim had queued but not begun gets its headers (and error) from Ray's proxy.
    after = [o for o in outcomes if o.ended > killed_at]
    hit = [o for o in after if o.replica == victim_id or (o.kind == "error" and not o.replica)]
    print(f"{len(hit)} streams met the killed replica: {[o.kind for o in hit]}")
    # (one whose last bytes were already on their way may still complete)
    return hit, victim_id, after


@needs_ray
@pytest.mark.slow
def test_sigterm_stops_serve_and_ray_and_exits_0(cluster: Cluster) -> None:
    tree = _descendants(cluster.process.pid)
    assert any(cmd.startswith(REPLICA_TITLE) for cmd in tree.values())
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(90) == 0, cluster.output()[-4000:]
    deadline = time.monotonic() + 30
    while True:  # Ray's processes end with it
        left = {}
        for pid, cmd in tree.items():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2] != "Z":
                left[pid] = cmd
        if not left:
            break
        assert time.monotonic() < deadline, left
        time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{cluster.url}/health", timeout=5)


def test_missing_ray_extra_is_one_line(runner, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    from gptkit.cli import cli
    from gptkit.serve_cmd import MISSING_RAY

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    result = runner.invoke(cli, ["serve", str(model), "--ray"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {MISSING_RAY}"


@needs_ray
def test_scaling_flags(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gptkit.cli import cli
    from gptkit.server.ray_serve import parse_autoscale

    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    for args in (
        ["--replicas", "2"],  # without --ray
        ["--ray", "--replicas", "0"],
        ["--ray", "--autoscale", "3:1"],
        ["--ray", "--autoscale", "four"],
        ["--ray", "--target-ongoing-requests", "4"],  # without --autoscale
    ):
        result = runner.invoke(cli, ["serve", str(model), *args])
        assert result.exit_code == 2, (args, result.output)
    assert parse_autoscale("0:4") == (0, 4)
    with pytest.raises(ValueError):
        parse_autoscale("0:0")


@needs_ray
def test_the_serve_run_config_builds_the_app(tmp_path: Path) -> None:
    """examples/ray_serve.yaml is a valid Serve config, and its args build the gptkit app."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from gptkit.server.ray_serve import app_builder

    config_path = Path(__file__).resolve().parent.parent / "examples" / "ray_serve.yaml"
    config = yaml.safe_load(config_path.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "gptkit.server.ray_serve:app_builder"
    built = app_builder({**app["args"], "model": str(tmp_path / "model.onnx")})
    deployment_config = built._bound_deployment._deployment_config  # what Ray will run
    scaling = deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    assert scaling.target_ongoing_requests == app["args"]["max_batch"]
    with pytest.raises(ValueError, match="unknown"):
        app_builder({"model": "m.onnx", "replica": 2})
