"""Serving benchmark: `gptkit serve` under concurrent streaming clients, next to the same server
with --max-batch 1, a thread-per-request server without batching
(benchmarks/thread_per_request_server.py) and llama.cpp's llama-server, on the same random GPT-2-shaped weights, in one run.

    python benchmarks/serve.py                                # gpt2; 1, 4, 8 and 16 clients
    python benchmarks/serve.py --llama-server /work/llama-build/build/bin/llama-server
    python benchmarks/serve.py --quick --out /tmp/serve.md    # tiny shape, a smoke run (~1 min)

Weights: random-init (torch seed 0), exported by gptkit's own exporter with `--kv-cache inplace`
in fp32 and int8 (benchmarks/_artifacts.py, cached in --work-dir as for decode.py). For
llama-server the same weights go through `export_hf` and llama.cpp's convert_hf_to_gguf.py
(scripts/fetch_llama_converter.sh) to GGUF f32 and q8_0.

Load: every client sends --requests-per-client requests back to back, each a 32-token prompt
(distinct for every request; the same ids for every system) and 128 greedy tokens, streamed. The
OpenAI servers get the prompt as token ids; the example, which takes text, gets the text that
encodes to those ids. End of text never stops a stream: logit_bias {eot: -100} for gptkit,
ignore_eos for llama-server, stop_at_eot false for the example; completion_tokens is checked.

Each server is a fresh process with 2 threads, warmed by one short request. The servers of one
precision run side by side, idle but for the one under load: every client level goes to each of
them in turn (interleaved, so the machine's other load falls on all alike):

    gptkit        gptkit serve MODEL --max-batch S --threads 2 (S = --max-batch, default the
                  largest client count)
    gptkit-b1     the same with --max-batch 1 (one request at a time, the rest queue)
    example       benchmarks/thread_per_request_server.py --threads 2 (one thread per request, one shared
                  runtime.Model, no batching)
    llama         llama-server -np S -c S*block_size -cb -t 2 on GGUF f32 / q8_0 (with
                  --llama-server PATH; else skipped)

Figures (measured at the client, from SSE chunk arrival times): aggregate tok/s = completion
tokens of all requests of a level / wall time from the first request sent to the last stream
ended; TTFT = request sent to its first token chunk; inter-token latency (ITL) = gaps between
consecutive token chunks of one stream (a chunk can carry more than one token when a server holds
back an incomplete UTF-8 character: the tok/chunk column says how often); p50/p95 over all
requests of the level. Peak RSS = VmHWM of the server's processes, read after each level (so it
grows with the load). Other load = cores kept busy by anything but the server and this client.

Long prompt: 7 streams decode (32-token prompts, 128 tokens); once each has 10 chunks, a prompt
of 900 tokens arrives (block_size 1024 for gpt2). Reported: the running streams' median gap
outside that prefill; each stream's largest gap between the long request's arrival and its first
token (the median over the 7 streams, so one stream whose text a server held back does not
decide it; the 5 largest gaps are in --json); and for scale the TTFT of a 64-token prompt (one
prefill chunk of the engine) and of a 900-token prompt on the idle server. The target compares
the delay (largest gap - median gap) with that one-chunk TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import ascii_lowercase
from typing import Any

import _common as common  # first: pins the BLAS/OpenMP thread pools
import _llamacpp
import _machine
import httpx
import numpy as np
from _artifacts import artifact_name, bench_tokenizer, prepare_artifacts, warm_runtime_cache
from _results import fmt

from runtime import onnx_contract as contract
from runtime.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = Path(sys.executable).parent  # gptkit's console script lives beside this interpreter
EXAMPLE = ROOT / "benchmarks" / "thread_per_request_server.py"

SYSTEMS = ("gptkit", "gptkit-b1", "example", "llama")
PRECISIONS = ("fp32", "int8")
LLAMA_TYPE = {"fp32": "f32", "int8": "q8_0"}  # gptkit precision -> GGUF type compared with it
PREFILL_CHUNK_DEFAULT = 64  # runtime/engine.py's PREFILL_CHUNK (read from there when present)
LONG_PROMPT = 900
LONG_NEW_TOKENS = 16
LONG_RUNNING = 7
LONG_WAIT_CHUNKS = 10  # chunks each running stream has before the long prompt is sent
TARGET_CLIENTS = 8
MIN_LEVEL_REQUESTS = 4  # a level with few clients sends more requests each (the 1-client figures
# are the targets' denominators)
READY_TIMEOUT_S = 300.0
KV_BYTES = 4  # the in-place export's cache is fp32 for both precisions
RSS_ALLOWANCE_MB = 200.0
BUSY_WARN = 0.25  # other load (cores) above which a row is flagged

Log = Callable[[str], None]


# ---- prompts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # encodes to exactly ``ids`` (for the example, which takes text)


def make_prompts(tokenizer: Tokenizer, count: int, length: int, seed: int) -> list[Prompt]:
    """``count`` distinct prompts of exactly ``length`` tokens: random lowercase words whose text
    round-trips through the tokenizer to the same ids."""
    rng = np.random.default_rng(seed)
    letters = list(ascii_lowercase)
    out: list[Prompt] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < count:
        words = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(length)]
        ids = tokenizer.encode(" ".join(words))[:length]
        text = tokenizer.decode(ids)
        if len(ids) == length and tokenizer.encode(text) == ids and tuple(ids) not in seen:
            seen.add(tuple(ids))
            out.append(Prompt(ids, text))
    return out


@dataclass(frozen=True)
class Prompts:
    load: list[Prompt]  # the levels' requests, then the long test's running streams
    warmup: Prompt
    chunk: list[Prompt]  # one prefill chunk long, for the idle TTFT
    long: list[Prompt]  # [0] alone on the idle server, [1] while streams decode


# ---- processes ----------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    children, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its descendants, summed (MiB)."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- servers ------------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    system: str
    precision: str
    label: str
    command: list[str]
    api: str  # "openai" (/v1/completions SSE) or "complete" (the example's POST /complete)
    port: int
    slots: int
    extra_body: dict[str, Any] = field(default_factory=dict)
    model_bytes: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Server:
    """One server process: started, waited for (/health 200), measured, stopped."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.model_name = "model"

    def start(self) -> float:
        """Starts the process and returns the seconds until /health answered 200."""
        start = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.spec.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() - start < READY_TIMEOUT_S:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.spec.label} exited with {self.proc.returncode}: {self.log_tail()}"
                    )
                try:
                    if client.get(self.spec.base + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                self.stop()
                raise RuntimeError(f"{self.spec.label} not ready in {READY_TIMEOUT_S:.0f} s")
            ready = time.perf_counter() - start
            if self.spec.api == "openai":
                try:
                    models = client.get(self.spec.base + "/v1/models").json()
                    self.model_name = models["data"][0]["id"]
                except (httpx.HTTPError, KeyError, IndexError, ValueError):
                    pass
        return ready

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to its process group after 30 s; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


# ---- the client ---------------------------------------------------------------------------------


@dataclass
class Stream:
    """One streamed request as the client saw it."""

    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival times of chunks carrying tokens
    tokens: int | None = None  # completion tokens the server reported (None: it reports none)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


async def openai_stream(
    client: httpx.AsyncClient, server: Server, ids: list[int], max_tokens: int, out: Stream
) -> None:
    body: dict[str, Any] = {
        "model": server.model_name,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **server.spec.extra_body,
    }
    if "n_predict" in body:
        body["n_predict"] = max_tokens
    out.sent = time.perf_counter()
    async with client.stream("POST", server.spec.base + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            out.error = f"HTTP {resp.status_code}: {text[:300]}"
            return
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if "error" in msg:
                out.error = json.dumps(msg["error"])[:300]
                continue
            choices = msg.get("choices") or []
            if choices:
                choice = choices[0]
                out.chunks.append(now)
                reason = choice.get("finish_reason")
                if reason:
                    out.finish_reason = reason
                    # An empty last chunk that only ends the stream carries no token (an empty
                    # chunk without a finish reason is a token whose text is held back).
                    if not choice.get("text") and len(out.chunks) > 1:
                        out.chunks.pop()
            usage = msg.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                out.tokens = int(usage["completion_tokens"])
            timings = msg.get("timings")  # llama-server's own count
            if out.tokens is None and timings and timings.get("predicted_n") is not None:
                out.tokens = int(timings["predicted_n"])


async def example_stream(
    client: httpx.AsyncClient, server: Server, text: str, max_tokens: int, out: Stream
) -> None:
    body = {
        "prompt": text,
        "max_new_tokens": max_tokens,
        "temperature": 0.0,
        "stop_at_eot": False,
        "stream": True,
    }
    out.sent = time.perf_counter()
    async with client.stream("POST", server.spec.base + "/complete", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            out.error = f"HTTP {resp.status_code}: {text[:300]}"
            return
        async for piece in resp.aiter_raw():
            if piece:
                out.chunks.append(time.perf_counter())
    out.finish_reason = "length"  # no stop strings, stop_at_eot false: it runs to max_new_tokens


async def request(
    client: httpx.AsyncClient, server: Server, prompt: Prompt, max_tokens: int, out: Stream
) -> Stream:
    try:
        if server.spec.api == "openai":
            await openai_stream(client, server, prompt.ids, max_tokens, out)
        else:
            await example_stream(client, server, prompt.text, max_tokens, out)
    except (httpx.HTTPError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"[:300]
    return out


def new_client(connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections + 4, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits)


# ---- measurements -------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


class Meter:
    """Wall time, the server's CPU time and the machine's busy time over a measurement."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.wall = time.perf_counter()
        self.server_cpu = tree_cpu_s(pid)
        self.own_cpu = time.process_time()
        self.busy = _machine.machine_busy_cpu_s()

    def other_cores(self) -> float | None:
        wall = time.perf_counter() - self.wall
        busy = _machine.machine_busy_cpu_s()
        if self.busy is None or busy is None or wall <= 0:
            return None
        mine = (tree_cpu_s(self.pid) - self.server_cpu) + (time.process_time() - self.own_cpu)
        return max(0.0, (busy - self.busy - mine) / wall)


@dataclass
class Level:
    clients: int
    requests: int
    tokens: int
    wall_s: float
    tok_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    itl_max_ms: float | None
    tokens_per_chunk: float | None
    short: int  # streams that reported fewer completion tokens than asked
    failed: int  # requests that ended in an error (not counted in tokens or latencies)
    errors: list[str]
    peak_rss_mb: float
    server_cpu_cores: float
    other_cores: float | None


async def run_level(
    server: Server, clients: int, per_client: int, prompts: list[Prompt], new_tokens: int
) -> Level:
    streams = [[Stream() for _ in range(per_client)] for _ in range(clients)]

    async with new_client(clients) as client:

        async def one_client(c: int) -> None:
            for r in range(per_client):
                await request(
                    client, server, prompts[c * per_client + r], new_tokens, streams[c][r]
                )

        meter = Meter(server.pid)
        start = time.perf_counter()
        server_cpu = tree_cpu_s(server.pid)
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - start
        server_cores = (tree_cpu_s(server.pid) - server_cpu) / wall
        other = meter.other_cores()
    done = [s for row in streams for s in row]
    ok = [s for s in done if s.error is None]
    tokens = sum(new_tokens if s.tokens is None else s.tokens for s in ok)
    chunks = sum(len(s.chunks) for s in ok)
    ttfts = [t for s in ok if (t := s.ttft) is not None]
    gaps = [g for s in ok for g in s.gaps()]
    return Level(
        clients=clients,
        requests=len(done),
        tokens=tokens,
        wall_s=wall,
        tok_s=tokens / wall,
        ttft_p50_ms=ms(pct(ttfts, 50)),
        ttft_p95_ms=ms(pct(ttfts, 95)),
        itl_p50_ms=ms(pct(gaps, 50)),
        itl_p95_ms=ms(pct(gaps, 95)),
        itl_max_ms=ms(max(gaps)) if gaps else None,
        tokens_per_chunk=tokens / chunks if chunks else None,
        short=sum(1 for s in ok if s.tokens is not None and s.tokens < new_tokens),
        failed=len(done) - len(ok),
        errors=sorted({s.error for s in done if s.error is not None}),
        peak_rss_mb=tree_peak_rss_mb(server.pid),
        server_cpu_cores=server_cores,
        other_cores=other,
    )


@dataclass
class LongPrompt:
    prompt_tokens: int
    running: int
    chunk_ttft_ms: float | None  # a PREFILL_CHUNK-token prompt alone on the idle server
    long_ttft_alone_ms: float | None  # the long prompt alone on the idle server
    long_ttft_loaded_ms: float | None  # the long prompt while the streams decode
    median_gap_ms: float | None  # the running streams' median inter-token gap
    # Each stream's largest gap between the long prompt's arrival and its first token; the median
    # over the streams (robust to one stream whose server held its text back for a while).
    max_gap_ms: float | None
    gaps_in_window: int
    largest_gaps_ms: list[float]  # the 5 largest gaps in the window, largest first
    errors: list[str]


async def _alone(server: Server, prompt: Prompt) -> Stream:
    """One request with max_tokens 1 on the idle server (its TTFT)."""
    async with new_client(1) as client:
        return await request(client, server, prompt, 1, Stream())


async def run_long_prompt(server: Server, prompts: Prompts, running: list[Prompt]) -> LongPrompt:
    idle = [await _alone(server, p) for p in prompts.chunk]
    chunk = [t for s in idle if s.error is None and (t := s.ttft) is not None]
    alone = await _alone(server, prompts.long[0])
    streams = [Stream() for _ in running]
    long_stream = Stream()
    async with new_client(len(running) + 1) as client:
        tasks = [
            asyncio.create_task(request(client, server, p, common.NEW_TOKENS, s))
            for p, s in zip(running, streams, strict=True)
        ]
        deadline = time.perf_counter() + 600
        while any(len(s.chunks) < LONG_WAIT_CHUNKS and s.error is None for s in streams):
            if time.perf_counter() > deadline or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.005)
        await request(client, server, prompts.long[1], LONG_NEW_TOKENS, long_stream)
        await asyncio.gather(*tasks)
    everyone = [*idle, alone, *streams, long_stream]
    errors = sorted({s.error for s in everyone if s.error is not None})
    arrival, first = long_stream.sent, (long_stream.chunks or [long_stream.sent])[0]
    window: list[float] = []  # gaps overlapping [arrival, first token of the long prompt]
    outside: list[float] = []
    worst: list[float] = []  # each running stream's largest gap in the window
    for s in streams:
        mine = [
            b - a for a, b in zip(s.chunks, s.chunks[1:], strict=False) if b > arrival and a < first
        ]
        window += mine
        outside += [
            b - a
            for a, b in zip(s.chunks, s.chunks[1:], strict=False)
            if not (b > arrival and a < first)
        ]
        if mine:
            worst.append(max(mine))
    return LongPrompt(
        prompt_tokens=len(prompts.long[1].ids),
        running=len(running),
        chunk_ttft_ms=ms(float(np.median(chunk))) if chunk else None,
        long_ttft_alone_ms=ms(alone.ttft if alone.error is None else None),
        long_ttft_loaded_ms=ms(long_stream.ttft),
        median_gap_ms=ms(pct(outside, 50)),
        max_gap_ms=ms(float(np.median(worst))) if worst else None,
        gaps_in_window=len(window),
        largest_gaps_ms=[g * 1000 for g in sorted(window, reverse=True)[:5]],
        errors=errors,
    )


@dataclass
class SystemRun:
    system: str
    precision: str
    label: str
    command: str
    slots: int
    ready_s: float | None = None
    exit_status: int | None = None
    levels: list[Level] = field(default_factory=list)
    long: LongPrompt | None = None
    peak_rss_mb: float | None = None
    model_mb: float | None = None
    skipped: str | None = None  # why there are no figures
    log_tail: str | None = None


def measure_precision(
    specs: list[ServerSpec], plan: Plan, prompts: Prompts, log: Log, log_dir: Path
) -> list[SystemRun]:
    """Every server of one precision, started together (idle, they use no CPU) and measured
    interleaved: each client level runs against every server in turn (the order rotating), so a
    change in the machine's other load falls on all of them alike rather than on one."""
    runs: list[SystemRun] = []
    servers: list[tuple[Server, SystemRun]] = []
    try:
        for spec in specs:
            run = SystemRun(
                spec.system,
                spec.precision,
                spec.label,
                shlex.join(spec.command),
                spec.slots,
                model_mb=spec.model_bytes / 2**20,
            )
            runs.append(run)
            server = Server(spec, log_dir / f"{spec.system}-{spec.precision}.log")
            try:
                run.ready_s = server.start()
                asyncio.run(_warm_up(server, prompts.warmup))
            except RuntimeError as e:
                run.skipped = str(e)
                run.exit_status = server.stop()
                run.log_tail = server.log_tail(600)
                log(f"  {spec.label} ({spec.precision}): FAILED: {e}")
                continue
            log(f"  {spec.label} ({spec.precision}): ready in {run.ready_s:.1f} s")
            servers.append((server, run))
        offset = 0
        for index, clients in enumerate(plan.clients):
            per_client = plan.per_client(clients)
            n = clients * per_client
            turn = servers[index % len(servers) :] + servers[: index % len(servers)]
            for server, run in turn:
                level = asyncio.run(
                    run_level(
                        server,
                        clients,
                        per_client,
                        prompts.load[offset : offset + n],
                        plan.new_tokens,
                    )
                )
                run.levels.append(level)
                log(
                    f"    {run.label} ({run.precision}), {clients:>2} clients: "
                    f"{level.tok_s:7.1f} tok/s, TTFT p50 {fmt(level.ttft_p50_ms, 0)} ms, ITL "
                    f"p50/p95 {fmt(level.itl_p50_ms)}/{fmt(level.itl_p95_ms)} ms, RSS "
                    f"{level.peak_rss_mb:.0f} MB, other load {fmt(level.other_cores, 2)}"
                    + (f", errors {level.errors}" if level.errors else "")
                )
            offset += n
        running = prompts.load[offset : offset + LONG_RUNNING]
        for server, run in servers:
            if run.slots > LONG_RUNNING and plan.long_prompt:
                lp = run.long = asyncio.run(run_long_prompt(server, prompts, running))
                log(
                    f"    {run.label} ({run.precision}), long prompt ({lp.prompt_tokens} tokens): "
                    f"running streams' median gap {fmt(lp.median_gap_ms)} ms, largest "
                    f"{fmt(lp.max_gap_ms)} ms; idle TTFT {fmt(lp.chunk_ttft_ms)} ms "
                    f"({plan.prefill_chunk} tokens), {fmt(lp.long_ttft_alone_ms)} ms "
                    f"({lp.prompt_tokens} tokens)"
                )
            run.peak_rss_mb = tree_peak_rss_mb(server.pid)
    finally:
        for server, run in servers:
            run.exit_status = server.stop()
            run.log_tail = server.log_tail(600)
    return runs


async def _warm_up(server: Server, prompt: Prompt) -> None:
    async with new_client(1) as client:
        s = await request(client, server, prompt, 8, Stream())
    if s.error is not None:
        raise RuntimeError(f"warm-up request failed: {s.error}")


# ---- llama.cpp ----------------------------------------------------------------------------------


def prepare_gguf(manifest: dict[str, Any], converter: Path, log: Log) -> dict[str, Path]:
    """GGUF f32 and q8_0 of the benchmark's weights (export_hf, then llama.cpp's converter),
    cached beside the exports until the weights change (the same files as decode.py's rows)."""
    gguf_dir = Path(manifest["weights"]).parent / "gguf"
    paths = {t: gguf_dir / f"model-{t}.gguf" for t in LLAMA_TYPE.values()}
    stamp = _llamacpp.converted_stamp(manifest, converter)
    stamp_path = gguf_dir / "stamp.json"
    if (
        stamp_path.is_file()
        and stamp_path.read_text() == stamp
        and all(p.is_file() for p in paths.values())
    ):
        return paths
    _llamacpp.convert(manifest, converter, paths, log)
    stamp_path.write_text(stamp)
    return paths


def llama_info(binary: Path) -> tuple[str, set[str]]:
    """(version line, the flags its --help lists)."""
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    text = (version.stdout + version.stderr).strip().splitlines()
    line = next((x for x in text if x.startswith("version")), text[-1] if text else "unknown")
    helptext = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    flags = set()
    for word in (helptext.stdout + helptext.stderr).replace(",", " ").split():
        if word.startswith("-"):
            flags.add(word)
    return line, flags


# ---- the plan -----------------------------------------------------------------------------------


@dataclass
class Plan:
    shape: str
    precisions: list[str]
    systems: list[str]
    clients: list[int]
    requests_per_client: int
    new_tokens: int
    max_batch: int
    long_prompt: bool
    work_dir: Path
    llama_server: Path | None
    converter: Path | None
    prefill_chunk: int = PREFILL_CHUNK_DEFAULT

    def per_client(self, clients: int) -> int:
        """Requests each client sends at this level: --requests-per-client, or more, so that a
        level has at least MIN_LEVEL_REQUESTS."""
        return max(self.requests_per_client, -(-MIN_LEVEL_REQUESTS // clients))


def prefill_chunk() -> int:
    try:
        engine = importlib.import_module("runtime.engine")
    except ImportError:
        return PREFILL_CHUNK_DEFAULT
    return int(getattr(engine, "PREFILL_CHUNK", PREFILL_CHUNK_DEFAULT))


def specs_for(
    plan: Plan,
    precision: str,
    model: Path,
    eot: int,
    block_size: int,
    gguf: dict[str, Path],
    llama_flags: set[str],
) -> list[ServerSpec]:
    specs = []
    threads = str(common.THREADS)
    for system in plan.systems:
        port = free_port()
        if system in ("gptkit", "gptkit-b1"):
            slots = plan.max_batch if system == "gptkit" else 1
            command = [str(VENV_BIN / "gptkit"), "serve", str(model), "--port", str(port)]
            command += ["--max-batch", str(slots), "--threads", threads]
            specs.append(
                ServerSpec(
                    system,
                    precision,
                    f"gptkit serve --max-batch {slots}",
                    command,
                    "openai",
                    port,
                    slots,
                    {"logit_bias": {str(eot): -100}},
                    model.stat().st_size,
                )
            )
        elif system == "example" and EXAMPLE.is_file():
            command = [sys.executable, str(EXAMPLE), "--model", str(model), "--port", str(port)]
            command += ["--threads", threads]
            label = "thread per request (no batching)"
            specs.append(
                ServerSpec(
                    system,
                    precision,
                    label,
                    command,
                    "complete",
                    port,
                    plan.max_batch,  # a thread per request: as many as the batched servers' slots
                    {},
                    model.stat().st_size,
                )
            )
        elif system == "llama" and plan.llama_server is not None:
            gguf_path = gguf[LLAMA_TYPE[precision]]
            slots = plan.max_batch
            command = [str(plan.llama_server), "-m", str(gguf_path), "--host", "127.0.0.1"]
            command += ["--port", str(port), "-t", threads, "-tb", threads]
            command += ["--parallel", str(slots), "-c", str(slots * block_size)]
            if "-cb" in llama_flags:
                command.append("-cb")
            if "--no-webui" in llama_flags:
                command.append("--no-webui")
            label = f"llama-server -np {slots} ({LLAMA_TYPE[precision]})"
            extra = {"ignore_eos": True, "n_predict": plan.new_tokens}
            specs.append(
                ServerSpec(
                    system,
                    precision,
                    label,
                    command,
                    "openai",
                    port,
                    slots,
                    extra,
                    gguf_path.stat().st_size,
                )
            )
    return specs


def run(plan: Plan, argv: list[str], log: Log) -> dict[str, Any]:
    started = time.perf_counter()
    info = _machine.machine_info()
    log(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_avg'][0]:.2f}")
    notes: list[str] = []
    artifacts = [artifact_name(p, contract.KV_INPLACE) for p in plan.precisions]
    log(f"weights and exports for {plan.shape} in {plan.work_dir} ...")
    manifest = prepare_artifacts(plan.shape, plan.work_dir, artifacts=artifacts)
    # As decode.py: the runtime's optimised-graph cache holds each file before a server loads it
    # (as `gptkit export` leaves it), so no server's start-up (or peak RSS) includes building it.
    notes.append("runtime load cache: " + "; ".join(warm_runtime_cache(manifest, artifacts)))
    config = manifest["config"]
    tokenizer = bench_tokenizer(config["vocab_size"])
    block_size = int(config["block_size"])
    plan.prefill_chunk = prefill_chunk()

    gguf: dict[str, Path] = {}
    llama_version: str | None = None
    llama_flags: set[str] = set()
    if "llama" in plan.systems:
        if plan.llama_server is None:
            notes.append(
                "llama-server rows skipped: no binary given (`--llama-server PATH`; "
                "benchmarks/README.md says how to build one)"
            )
        else:
            llama_version, llama_flags = llama_info(plan.llama_server)
            converter = _llamacpp.find_converter(plan.work_dir, log, given=plan.converter)
            gguf = prepare_gguf(manifest, converter, log)
    if "example" in plan.systems and not EXAMPLE.is_file():
        notes.append(f"example rows skipped: {EXAMPLE.relative_to(ROOT)} is not in this checkout")

    total = sum(c * plan.per_client(c) for c in plan.clients) + LONG_RUNNING
    long_len = min(LONG_PROMPT, block_size - LONG_NEW_TOKENS - 16)
    prompts = Prompts(
        load=make_prompts(tokenizer, total, common.PROMPT_LEN, common.PROMPT_SEED),
        warmup=make_prompts(tokenizer, 1, common.PROMPT_LEN, common.PROMPT_SEED + 1)[0],
        chunk=make_prompts(tokenizer, 3, plan.prefill_chunk, common.PROMPT_SEED + 2),
        long=make_prompts(tokenizer, 2, long_len, common.PROMPT_SEED + 3),
    )
    log_dir = plan.work_dir / plan.shape / "serve-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs: list[SystemRun] = []
    for precision in plan.precisions:
        model = Path(manifest["exports"][artifact_name(precision, contract.KV_INPLACE)]["path"])
        specs = specs_for(
            plan, precision, model, tokenizer.eot_token, block_size, gguf, llama_flags
        )
        runs += measure_precision(specs, plan, prompts, log, log_dir)
    return {
        "command": "python benchmarks/serve.py" + (" " + shlex.join(argv) if argv else ""),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "seconds": time.perf_counter() - started,
        "plan": {
            **{k: v for k, v in asdict(plan).items() if not isinstance(v, Path)},
            "llama_server": str(plan.llama_server) if plan.llama_server else None,
        },
        "config": config,
        "n_params": manifest["n_params"],
        "machine": info,
        "load_avg_end": os.getloadavg(),
        "llama_version": llama_version,
        "runs": [asdict(r) for r in runs],
        "notes": notes,
    }


# ---- the report ---------------------------------------------------------------------------------


def kv_slots_mb(config: dict[str, Any], slots: int) -> float:
    per_slot = config["n_layer"] * 2 * config["n_embd"] * config["block_size"] * KV_BYTES
    return float(slots * per_slot / 2**20)


def _find(data: dict[str, Any], system: str, precision: str) -> dict[str, Any] | None:
    for r in data["runs"]:
        if r["system"] == system and r["precision"] == precision and not r["skipped"]:
            return r  # type: ignore[no-any-return]
    return None


def _level(run: dict[str, Any] | None, clients: int) -> dict[str, Any] | None:
    if run is None:
        return None
    return next((lv for lv in run["levels"] if lv["clients"] == clients), None)


def _verdict(value: float, need: float, at_least: bool) -> str:
    if (value >= need) if at_least else (value <= need):
        return "**PASS**"
    off = (need - value) / need if at_least else (value - need) / need
    return f"**MISS** (by {100 * off:.0f} %)"


def targets(data: dict[str, Any]) -> list[str]:
    plan = data["plan"]
    levels = [c for c in plan["clients"] if c > 1]
    at = TARGET_CLIENTS if TARGET_CLIENTS in plan["clients"] else max(levels, default=0)
    lines = []
    if at != TARGET_CLIENTS:
        lines.append(f"(no {TARGET_CLIENTS}-client level in this run: judged at {at} clients)")
    for precision in plan["precisions"]:
        gk = _find(data, "gptkit", precision)
        one, many = _level(gk, 1), _level(gk, at)
        if one and many:
            r = many["tok_s"] / one["tok_s"]
            lines.append(
                f"{_verdict(r, 4.0, True)} {precision}: {at} clients {many['tok_s']:.1f} tok/s = "
                f"{r:.2f}× the same server with 1 client ({one['tok_s']:.1f}); needs ≥ 4×"
            )
        llama = _level(_find(data, "llama", precision), at)
        if many and llama:
            r = many["tok_s"] / llama["tok_s"]
            lines.append(
                f"{_verdict(r, 1.5, True)} {precision}: {at} clients {many['tok_s']:.1f} tok/s = "
                f"{r:.2f}× llama-server {LLAMA_TYPE[precision]} ({llama['tok_s']:.1f}); needs ≥ 1.5×"
            )
        elif many:
            lines.append(f"– {precision}: vs llama-server: not measured (no llama-server row)")
        if one and many and one["itl_p50_ms"] and many["itl_p95_ms"]:
            r = many["itl_p95_ms"] / one["itl_p50_ms"]
            lines.append(
                f"{_verdict(r, 2.5, False)} {precision}: ITL p95 at {at} clients "
                f"{many['itl_p95_ms']:.1f} ms = {r:.2f}× the 1-client step (ITL p50 "
                f"{one['itl_p50_ms']:.1f} ms); needs ≤ 2.5×"
            )
        lp = gk["long"] if gk else None
        if lp and lp["max_gap_ms"] is not None and lp["median_gap_ms"] and lp["chunk_ttft_ms"]:
            extra = lp["max_gap_ms"] - lp["median_gap_ms"]
            r = extra / lp["chunk_ttft_ms"]
            lines.append(
                f"{_verdict(r, 1.0, False)} {precision}: the {lp['prompt_tokens']}-token prompt "
                f"delayed the {lp['running']} running streams by {extra:.1f} ms at most (largest "
                f"gap {lp['max_gap_ms']:.1f} ms vs median {lp['median_gap_ms']:.1f} ms) = "
                f"{r:.2f}× one {plan['prefill_chunk']}-token prefill chunk "
                f"({lp['chunk_ttft_ms']:.1f} ms, its TTFT alone); needs ≤ 1× (the whole prompt "
                f"alone takes {fmt(lp['long_ttft_alone_ms'])} ms)"
            )
            chunks = -(-lp["prompt_tokens"] // plan["prefill_chunk"])
            if lp["long_ttft_loaded_ms"]:
                per_step = lp["long_ttft_loaded_ms"] / chunks
                lines.append(
                    f"(context) {precision}: {lp['gaps_in_window'] / lp['running']:.0f} gaps of each "
                    f"running stream fell within its prefill ({chunks} chunks of "
                    f"{plan['prefill_chunk']}); {lp['long_ttft_loaded_ms']:.0f} ms under load = "
                    f"{per_step:.1f} ms per chunk; the largest gap is "
                    f"{lp['max_gap_ms'] / per_step:.2f}× that"
                )
        if gk and gk["peak_rss_mb"]:
            kv = kv_slots_mb(data["config"], gk["slots"])
            budget = gk["model_mb"] + kv + RSS_ALLOWANCE_MB
            r = gk["peak_rss_mb"] / budget
            lines.append(
                f"{_verdict(r, 1.0, False)} {precision}: server peak RSS {gk['peak_rss_mb']:.0f} MB "
                f"= {r:.2f}× the budget {budget:.0f} MB (model file {gk['model_mb']:.0f} + KV "
                f"slots {gk['slots']} × {kv / gk['slots']:.0f} = {kv:.0f} + {RSS_ALLOWANCE_MB:.0f})"
            )
    return lines


def render(data: dict[str, Any]) -> str:
    plan, cfg, m = data["plan"], data["config"], data["machine"]
    out = [
        "# Serving benchmark results",
        "",
        f"Made by `{data['command']}` on {data['date']} in {data['seconds'] / 60:.1f} min.",
        "",
        f"Shape `{plan['shape']}` ({data['n_params'] / 1e6:.1f} M parameters, n_layer "
        f"{cfg['n_layer']}, n_embd {cfg['n_embd']}, block_size {cfg['block_size']}, vocab "
        f"{cfg['vocab_size']}), random weights, `--kv-cache inplace` exports; "
        f"{common.PROMPT_LEN}-token prompts, {plan['new_tokens']} greedy tokens each, "
        f"{plan['requests_per_client']} request(s) per client back to back (at least "
        f"{MIN_LEVEL_REQUESTS} per level); {common.THREADS} "
        "threads per server; the servers of one precision measured interleaved, level by level.",
        "",
        f"Machine: {m['cpu']} ({m['simd']}), {m['cores']} cores, {m['memory_gb']} GB RAM; "
        f"Python {m['python']}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in m['load_avg'])}, at the end "
        f"{' '.join(f'{x:.2f}' for x in data['load_avg_end'])}.",
        "Versions: "
        + " · ".join(f"{k} {v}" for k, v in m["versions"].items())
        + (f" · llama.cpp {data['llama_version']}" if data["llama_version"] else ""),
        "",
        "## Throughput and latency (measured at the client)",
        "",
        "| precision | server | clients | requests | tok/s | TTFT p50 ms | TTFT p95 ms | "
        "ITL p50 ms | ITL p95 ms | ITL max ms | tok/chunk | server cores | peak RSS MB | "
        "other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["runs"]:
        if r["skipped"]:
            continue
        for lv in r["levels"]:
            other = lv["other_cores"]
            mark = " ⚠" if other is not None and other > BUSY_WARN else ""
            flags = f" ({lv['failed']} failed)" if lv["failed"] else ""
            flags += f" ({lv['short']} short)" if lv["short"] else ""
            out.append(
                f"| {r['precision']} | {r['label']} | {lv['clients']} | {lv['requests']}{flags} | "
                f"{lv['tok_s']:.1f} | {fmt(lv['ttft_p50_ms'], 0)} | {fmt(lv['ttft_p95_ms'], 0)} | "
                f"{fmt(lv['itl_p50_ms'])} | {fmt(lv['itl_p95_ms'])} | {fmt(lv['itl_max_ms'], 0)} | "
                f"{fmt(lv['tokens_per_chunk'], 2)} | {lv['server_cpu_cores']:.2f} | "
                f"{lv['peak_rss_mb']:.0f} | {fmt(other, 2)}{mark} |"
            )
    out += [
        "",
        f"## A long prompt arriving while {LONG_RUNNING} streams decode",
        "",
        "| precision | server | prompt tokens | running streams' median gap ms | largest gap "
        "during its prefill ms | extra ms | TTFT alone: "
        f"{plan['prefill_chunk']} tokens ms | TTFT alone: long prompt ms | "
        "TTFT under load ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["runs"]:
        lp = r["long"]
        if not lp:
            continue
        extra = (
            lp["max_gap_ms"] - lp["median_gap_ms"]
            if lp["max_gap_ms"] is not None and lp["median_gap_ms"] is not None
            else None
        )
        out.append(
            f"| {r['precision']} | {r['label']} | {lp['prompt_tokens']} | "
            f"{fmt(lp['median_gap_ms'])} | {fmt(lp['max_gap_ms'])} | {fmt(extra)} | "
            f"{fmt(lp['chunk_ttft_ms'])} | {fmt(lp['long_ttft_alone_ms'], 0)} | "
            f"{fmt(lp['long_ttft_loaded_ms'], 0)} |"
            + (f" errors: {'; '.join(lp['errors'])}" if lp["errors"] else "")
        )
    out += ["", "## Targets", ""] + [f"- {t}" for t in targets(data)] + [""]
    out += ["## Servers", "", "| precision | server | ready s | model MB | command |"]
    out += ["|---|---|---:|---:|---|"]
    for r in data["runs"]:
        status = f"skipped: {r['skipped']}" if r["skipped"] else f"`{r['command']}`"
        out.append(
            f"| {r['precision']} | {r['label']} | {fmt(r['ready_s'])} | "
            f"{fmt(r['model_mb'], 0)} | {status} |"
        )
    notes = list(data["notes"])
    for r in data["runs"]:
        for lv in r["levels"]:
            if lv["errors"]:
                notes.append(
                    f"{r['label']} {r['precision']} at {lv['clients']} clients: {lv['failed']} of "
                    f"{lv['requests']} requests failed: " + "; ".join(lv["errors"])
                )
    merged = sorted(
        {
            r["label"]
            for r in data["runs"]
            for lv in r["levels"]
            if (lv["tokens_per_chunk"] or 1) > 1.02
        }
    )
    if merged:
        notes.append(
            ", ".join(merged)
            + ": more than one token per streamed chunk (tok/chunk): a server sends no chunk "
            "for a token whose text it holds back (an incomplete UTF-8 sequence), so these rows' "
            "ITL figures are per chunk and include multi-token gaps"
        )
    busy = [
        f"{r['label']} {r['precision']} at {lv['clients']} ({lv['other_cores']:.2f})"
        for r in data["runs"]
        for lv in r["levels"]
        if (lv["other_cores"] or 0.0) > BUSY_WARN
    ]
    others = [lv["other_cores"] for r in data["runs"] for lv in r["levels"] if lv["other_cores"]]
    most = max(others, default=0.0)
    if busy:
        notes.append(
            f"**Shared machine**: other processes kept more than {BUSY_WARN} core busy beside the "
            "server and this client while these ran (cores): " + ", ".join(busy) + "; their "
            "figures are not comparable with the other rows"
        )
    elif m["load_avg"][0] > 0.5:
        notes.append(
            f"Shared machine: the 1-minute load average was {m['load_avg'][0]:.2f} at the start "
            "(other work on this 2-core VM before the run), but while the levels ran other "
            f"processes used at most {most:.2f} core (the other load column)"
        )
    notes.append(
        "The client (this script, asyncio + httpx) runs on the same 2 cores as the server it "
        "drives; its CPU time is not in the other load column"
    )
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# ---- command line -------------------------------------------------------------------------------


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _csv_strs(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, 1 and 8 clients, 1 req")
    parser.add_argument("--shape", help="model shape preset (default gpt2; --quick: tiny)")
    parser.add_argument("--clients", type=_csv_ints, help="default 1,4,8,16 (--quick: 1,8)")
    parser.add_argument(
        "--requests-per-client", type=int, help="requests each client sends (default 2; quick 1)"
    )
    parser.add_argument(
        "--max-batch", type=int, help="slots of the batched servers (default: most clients)"
    )
    parser.add_argument(
        "--precisions", type=_csv_strs, default=list(PRECISIONS), help="fp32,int8 (default both)"
    )
    parser.add_argument(
        "--systems", type=_csv_strs, default=list(SYSTEMS), help=f"default {','.join(SYSTEMS)}"
    )
    parser.add_argument("--no-long-prompt", action="store_true", help="skip the long-prompt test")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary")
    parser.add_argument(
        "--llama-converter",
        type=Path,
        help=f"convert_hf_to_gguf.py (default ${_llamacpp.CONVERTER_ENV}, else fetched)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "SERVE.md", help="markdown report")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument(
        "--from-json", type=Path, help="render the report from a --json file of an earlier run"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=common.DEFAULT_WORK_DIR,
        help=f"weights, exports, GGUF files, server logs (default {common.DEFAULT_WORK_DIR})",
    )
    args = parser.parse_args(argv)
    for name, given, known in (
        ("system", args.systems, SYSTEMS),
        ("precision", args.precisions, PRECISIONS),
    ):
        if set(given) - set(known):
            parser.error(f"unknown {name}(s) {set(given) - set(known)}; choose from {known}")
    clients = args.clients or ([1, 8] if args.quick else [1, 4, 8, 16])
    if args.llama_server is not None and not os.access(args.llama_server, os.X_OK):
        parser.error(f"--llama-server {args.llama_server} is not an executable")
    plan = Plan(
        shape=args.shape or ("tiny" if args.quick else "gpt2"),
        precisions=[p for p in PRECISIONS if p in args.precisions],
        systems=[s for s in SYSTEMS if s in args.systems],
        clients=sorted(set(clients)),
        requests_per_client=args.requests_per_client or (1 if args.quick else 2),
        new_tokens=common.NEW_TOKENS,
        max_batch=args.max_batch or max(clients),
        long_prompt=not args.no_long_prompt,
        work_dir=args.work_dir,
        llama_server=args.llama_server.resolve() if args.llama_server else None,
        converter=args.llama_converter,
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data = json.loads(args.from_json.read_text()) if args.from_json else run(plan, argv, log)
    report = render(data)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
