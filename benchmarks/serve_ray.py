"""Ray Serve replicas against plain `gptkit serve`: aggregate tokens/s of concurrent streams.

    python benchmarks/serve_ray.py --model /tmp/gptkit-bench/gpt2/inplace-int8/model.onnx

Starts, one after the other, `gptkit serve MODEL` (2 ORT threads), `--ray --replicas 1`
(2 threads) and `--ray --replicas 2` (1 thread each: the same two cores), sends the same load to
each (N concurrent streaming clients, R requests each, T greedy tokens with <|endoftext|> banned)
and prints tokens/s and how many requests each replica answered (the `x-gptkit-replica` header).
Make the model with `python benchmarks/serve.py` (it exports GPT-2-124M-shaped random weights)
or `gptkit export --kv-cache inplace`. On one machine the replicas share its cores: the figures
show the overhead and the scheduling effect of replicas, not the scaling a cluster gives.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
GPTKIT = [sys.executable, "-m", "gptkit"]
SETUPS = {  # label: extra flags of `gptkit serve`
    "gptkit serve --threads 2": ["--threads", "2"],
    "--ray --replicas 1 --threads 2": ["--ray", "--replicas", "1", "--threads", "2"],
    "--ray --replicas 2 --threads 1": ["--ray", "--replicas", "2", "--threads", "1"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("the server did not become ready")


def load(url: str, clients: int, requests: int, tokens: int, eot: int) -> dict[str, object]:
    """Every client streams ``requests`` completions back to back; tokens/s over the wall time."""
    done: list[tuple[str, int]] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(requests):
            payload = {
                "prompt": f"ROMEO {c}-{k}: the",
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": {str(eot): -100},
            }
            with httpx.stream("POST", url + "/v1/completions", json=payload, timeout=600) as r:
                replica = r.headers.get("x-gptkit-replica", "-")
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"choices":[]' in line.replace(" ", ""):
                        usage = json.loads(line[6:])["usage"]  # the last chunk: usage only
                        with lock:
                            done.append((replica, usage["completion_tokens"]))

    httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=600)
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    generated = sum(n for _, n in done)
    return {
        "requests": len(done),
        "tokens": generated,
        "wall_s": round(wall, 2),
        "tok_s": round(generated / wall, 1),
        "by_replica": dict(Counter(r for r, _ in done)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    model = str(Path(args.model).resolve())
    sys.path.insert(0, str(ROOT))
    import runtime

    eot = runtime.load(model).tokenizer.eot_token  # banned, so every request runs its length
    print(
        f"model {model}; {args.clients} clients x {args.requests_per_client} requests x "
        f"{args.tokens} tokens; load average {os.getloadavg()[0]:.2f}"
    )
    print("| server | tok/s | requests by replica | wall s |\n|---|---:|---|---:|")
    for label, flags in SETUPS.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            *GPTKIT,
            "serve",
            model,
            "--port",
            str(port),
            "--max-batch",
            str(args.max_batch),
            *flags,
        ]
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_ready(url, process)
            result = load(url, args.clients, args.requests_per_client, args.tokens, eot)
            replicas = ", ".join(f"{n}" for n in result["by_replica"].values())  # type: ignore[attr-defined]
            print(
                f"| `{label}` | {result['tok_s']} | {replicas} | {result['wall_s']} |", flush=True
            )
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
