"""Ray Serve replicas against plain `gptkit serve`: the same load through each, in one run.

    python benchmarks/serve_ray.py --model /tmp/gptkit-bench/gpt2/inplace-int8/model.onnx

Starts, one after the other, `gptkit serve MODEL` (2 ORT threads), `--ray --replicas 1`
(2 threads) and `--ray --replicas 2` (1 thread each: the same two cores), and drives each with
benchmarks/serve.py's client (N concurrent streaming clients, R requests each, 32-token prompts,
T greedy tokens with <|endoftext|> banned). Make the model with `python benchmarks/serve.py` (it
exports GPT-2-124M-shaped random weights) or `gptkit export --kv-cache inplace`. On one machine
the replicas share its cores: the figures show the cost of Ray, not the scaling a cluster gives.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from serve import ROOT, VENV_BIN, Server, ServerSpec, free_port, make_prompts, run_level

SETUPS = {  # label: extra flags of `gptkit serve`
    "gptkit serve --threads 2": ["--threads", "2"],
    "--ray --replicas 1 --threads 2": ["--ray", "--replicas", "1", "--threads", "2"],
    "--ray --replicas 2 --threads 1": ["--ray", "--replicas", "2", "--threads", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    model = Path(args.model).resolve()
    sys.path.insert(0, str(ROOT))
    import runtime

    tokenizer = runtime.load(model).tokenizer
    count = args.clients * args.requests_per_client
    warmup, *prompts = make_prompts(tokenizer, count + 1, 32, seed=0)
    ban_eot = {"logit_bias": {str(tokenizer.eot_token): -100}}  # every request runs its length
    print(
        f"model {model}; {args.clients} clients x {args.requests_per_client} requests x "
        f"{args.tokens} tokens; load average {os.getloadavg()[0]:.2f}"
    )
    print("| server | tok/s | TTFT p50 ms | ITL p50 / p95 ms | failed |\n|---|---:|---:|---:|---:|")
    logs = Path(tempfile.mkdtemp(prefix="gptkit-serve-ray-"))
    for label, flags in SETUPS.items():
        port = free_port()
        command = [str(VENV_BIN / "gptkit"), "serve", str(model), "--port", str(port)]
        command += ["--max-batch", str(args.max_batch), *flags]
        spec = ServerSpec("gptkit", "", label, command, "openai", port, args.max_batch, ban_eot)
        server = Server(spec, logs / f"{port}.log")
        try:
            server.start()
            asyncio.run(run_level(server, 1, 1, [warmup], 8))
            level = asyncio.run(
                run_level(server, args.clients, args.requests_per_client, prompts, args.tokens)
            )
        finally:
            server.stop()
        print(
            f"| `{label}` | {level.tok_s:.1f} | {level.ttft_p50_ms or 0:.0f} | "
            f"{level.itl_p50_ms or 0:.1f} / {level.itl_p95_ms or 0:.1f} | {level.failed} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
