"""The decode benchmark's subprocess: one system at one batch size, or one shape's artifacts.

``decode.py`` runs this file in a fresh interpreter for every measurement, so each system's peak
RSS and cold start are its own, and reads back the one ``RESULT {json}`` line it prints:

    python benchmarks/_worker.py --worker '{"system": ..., "manifest": ..., "batch": ...}'
    python benchmarks/_worker.py --prepare SHAPE --work-dir DIR [--artifacts A,B] [--warm A,B]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import _common as common
import numpy as np
from _systems import make_system

MIN_MEASURED_S = 2.0  # repeat short generations until this much time has been measured ...
MAX_RUNS = 30  # ... but at most this many times


def worker(spec: dict) -> dict:
    """Time ``spec["system"]`` on the workload: a cold-start run, then ``spec["runs"]`` or more
    timed generations, then (with ``spec["probe"]``) per-step latency by cache length."""
    if spec["system"].startswith("llama-"):  # llama.cpp's own programs, each in its own process
        import _llamacpp

        return _llamacpp.worker(spec)
    started = time.time()
    manifest = json.loads(Path(spec["manifest"]).read_text())
    config = manifest["config"]
    prompt = common.prompt_ids(spec["batch"], config["vocab_size"])
    runner = make_system(spec["system"], manifest)
    loaded = time.time()
    cold = runner.generate(prompt, common.NEW_TOKENS)  # the warm-up is the cold-start run
    result = {
        "system": spec["system"],
        "batch": spec["batch"],
        "api": runner.api,
        "spawn_to_main_s": started - spec["t_spawn"],
        "load_s": loaded - started,  # imports + model load
        "cold_start_s": cold.first_token_wall - spec["t_spawn"],
    }
    if spec.get("cold_only"):
        return result
    # Short runs (tiny) are repeated until about MIN_MEASURED_S of generation has been timed.
    n_runs = min(MAX_RUNS, max(spec["runs"], math.ceil(MIN_MEASURED_S / max(cold.total, 1e-3))))
    runs = [runner.generate(prompt, common.NEW_TOKENS) for _ in range(n_runs)]
    ttft = common.median([r.ttft for r in runs])
    total = common.median([r.total for r in runs])
    decode = common.median([r.total - r.ttft for r in runs])
    steps = common.NEW_TOKENS - 1
    result.update(
        ttft_ms=ttft * 1e3,
        total_s=total,
        step_ms=decode / steps * 1e3,
        decode_tok_s=spec["batch"] * steps / decode,
        tokens=runs[-1].tokens.tolist(),
        all_runs_equal=all(np.array_equal(r.tokens, runs[0].tokens) for r in runs),
        n_tokens=int(runs[-1].tokens.shape[1]),
        runs=n_runs,
    )
    import _machine  # after the cold start: only the system's own imports are in it

    result["peak_rss_mb"] = _machine.peak_rss_mb()  # the workload's peak, before the probes
    if hasattr(runner, "cache_mode"):
        result["cache_mode"] = runner.cache_mode(prompt)
    if spec.get("probe"):
        result["probe_ms"] = _probe(runner, config, spec.get("probe_repeats", 2))
        result["peak_rss_full_context_mb"] = _machine.peak_rss_mb()  # after a near-block prompt
    return result


def _probe(runner, config: dict, repeats: int) -> dict[str, float]:
    """Median decode-step latency (batch 1) with a cache of about P tokens, for each probe P."""
    probes = {}
    rng = np.random.default_rng(7)
    for position in common.probe_positions(config["block_size"], common.PROBE_NEW_TOKENS):
        prompt = rng.integers(0, config["vocab_size"] - 1, size=(1, position), dtype=np.int64)
        steps: list[float] = []
        for _ in range(repeats):
            steps += runner.generate(prompt, common.PROBE_NEW_TOKENS).step_times(skip=1)
        probes[str(position)] = common.median(steps) * 1e3
    return probes


def prepare(shape: str, work_dir: Path, *, rebuild: bool, artifacts, warm) -> dict:
    """One shape's weights and exports (built or reused), each gptkit file loaded once."""
    import _artifacts

    manifest = _artifacts.prepare_artifacts(shape, work_dir, force=rebuild, artifacts=artifacts)
    manifest["warmed"] = _artifacts.warm_runtime_cache(manifest, warm or [])
    return manifest


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--worker", metavar="SPEC", help="time one system (a JSON spec)")
    mode.add_argument("--prepare", metavar="SHAPE", help="make one shape's weights and exports")
    parser.add_argument("--work-dir", type=Path, default=common.DEFAULT_WORK_DIR)
    parser.add_argument("--artifacts", type=_csv, help="exports to make (default: all)")
    parser.add_argument("--warm", type=_csv, help="exports to load once with runtime.load")
    parser.add_argument("--rebuild", action="store_true", help="re-create even if cached")
    parser.add_argument("--t-spawn", type=float, default=0.0, help="time.time() at the spawn")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        spec["t_spawn"] = args.t_spawn or time.time()
        result = worker(spec)
    else:
        result = prepare(
            args.prepare,
            args.work_dir,
            rebuild=args.rebuild,
            artifacts=args.artifacts,
            warm=args.warm,
        )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
