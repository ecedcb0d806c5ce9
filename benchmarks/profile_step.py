"""Where one decode step of the gptkit runtime spends its time.

    python benchmarks/profile_step.py                          # gpt2 fp32, cache of 16 and ~1000
    python benchmarks/profile_step.py --shape tiny --precision int8
    python benchmarks/profile_step.py --kv-cache inplace             # the --kv-cache inplace export
    python benchmarks/profile_step.py --kv-cache inplace --precision int4 --kv-cache-dtype int8
    python benchmarks/profile_step.py path/to/model.onnx --positions 32 --steps 32
    python benchmarks/profile_step.py --shape small-cpu --kv-cache inplace --python-only
    python benchmarks/profile_step.py --kv-cache inplace --precision int8 --load

Loads the model with ``runtime.load`` (onnxruntime profiling switched on), prefills a random prompt
of P tokens, then greedily decodes --steps tokens through the runtime's own loop, and reports for
the decode steps only (the prefill is left out):

- the wall time of a step, split into the ONNX Runtime run (kernels and what ORT does between
  them) and everything outside it (building feeds or IO binding, logits out, sampling, the loop);
- ONNX Runtime's kernel time by operator type, and the most expensive single nodes.

``--python-only`` instead times the runtime's loop with ONNX Runtime's run replaced by a no-op:
what gptkit itself adds to every step, at batch 1 and 8 (in-place exports). ``--load`` times
creating the session (through the runtime's graph cache, as ``runtime.load``) with ONNX
Runtime's weight prepacking on and off, each in a fresh process, with the peak memory it adds.

Without a model path it uses (and if needed builds) the benchmark's artifacts for --shape,
--precision and --kv-cache, the same random-init weights and exports as benchmarks/decode.py. The
runtime writes an in-place export's cache into one shared buffer per layer, as in decode.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _common as common
import numpy as np
from _artifacts import ARTIFACTS, artifact_name, prepare_artifacts

from export.options import KV_CACHE_DTYPES
from runtime.generation import PREFILL_CHUNK
from runtime.onnx_contract import KV_CACHE_MODES, KV_CONCAT, KV_INPLACE

PRECISIONS = tuple(dict.fromkeys(spec[0] for spec in ARTIFACTS.values()))


def profile(path: Path, positions: list[int] | None, steps: int, threads: int) -> list[dict]:
    """Profile ``steps`` decode steps after a random prompt of P tokens, for each P."""
    import onnxruntime as ort

    import runtime.model

    # runtime.load builds its own SessionOptions; switch profiling on for the session it creates.
    real_options = ort.SessionOptions

    def profiling_options() -> ort.SessionOptions:
        options = real_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "gptkit-step-profile")
        return options

    ort.SessionOptions = profiling_options
    try:
        model = runtime.model.load(path, threads=threads)
    finally:
        ort.SessionOptions = real_options
    session = _inference_session(model, ort.InferenceSession)
    if positions is None:
        positions = [16, model.block_size - steps - 2]

    rng = np.random.default_rng(7)
    walls = []
    for position in positions:
        print(f"profiling {path.name} at cache length {position} ...", file=sys.stderr)
        prompt = rng.integers(0, model.metadata.vocab_size - 1, size=position).tolist()
        stamps = [time.perf_counter() for _ in common.runtime_tokens(model, [prompt], steps + 1)]
        walls.append(np.diff(stamps))  # token k -> k+1 spans exactly one decode step
    profile_file = session.end_profiling()
    events = json.loads(Path(profile_file).read_text())
    Path(profile_file).unlink()

    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    nodes = [
        e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
    ]
    results = []
    start = 0
    for k, position in enumerate(positions):
        # A batch-1 prompt is prefilled in runs of PREFILL_CHUNK tokens, then one run per step.
        prefill_runs = math.ceil(position / PREFILL_CHUNK)
        decode_runs = runs[start + prefill_runs : start + prefill_runs + steps]
        start += prefill_runs + steps
        first, last = decode_runs[0], decode_runs[-1]
        window = (first["ts"], last["ts"] + last["dur"])
        by_op: dict[str, float] = defaultdict(float)
        count_op: dict[str, int] = defaultdict(int)
        by_node: dict[str, float] = defaultdict(float)
        for e in nodes:
            if window[0] <= e["ts"] <= window[1]:
                op = e["args"].get("op_name", "?")
                by_op[op] += e["dur"]
                count_op[op] += 1
                by_node[f"{op} {e['name'].removesuffix('_kernel_time')}"] += e["dur"]
        n = len(decode_runs)
        per_run = [  # kernel time inside each decode run, so its median pairs with model_run's
            sum(e["dur"] for e in nodes if r["ts"] <= e["ts"] <= r["ts"] + r["dur"])
            for r in decode_runs
        ]
        results.append(
            {
                "model": str(path),
                "position": position,
                "steps": n,
                "wall_ms": float(np.median(walls[k])) * 1e3,
                "ort_run_ms": float(np.median([r["dur"] for r in decode_runs])) / 1e3,
                "kernel_ms": float(np.median(per_run)) / 1e3,
                "kernel_mean_ms": sum(by_op.values()) / n / 1e3,  # what the op shares add up to
                "ops": {op: (t / n / 1e3, count_op[op] // n) for op, t in by_op.items()},
                "nodes": {name: t / n / 1e3 for name, t in by_node.items()},
            }
        )
    return results


def python_cost(path: Path, batches: list[int], steps: int, threads: int) -> str:
    """The runtime's own cost per decode step: its loop with ONNX Runtime's run made a no-op.

    An in-place export's steps write their outputs into buffers bound once, so skipping the run
    leaves every Python-side operation of a step in place (binding, the mask, token choice, the
    events) and times exactly those: a figure without the run-to-run noise of the kernels.
    """
    import onnxruntime as ort

    import runtime.model

    model = runtime.model.load(path, threads=threads)
    if not getattr(model._session, "inplace", False):
        raise SystemExit("--python-only needs a --kv-cache inplace export (outputs bound once)")
    session = _inference_session(model, ort.InferenceSession)
    real_run = session.run_with_iobinding
    rng = np.random.default_rng(7)
    lines = [
        f"## Python cost of a decode step: {path.parent.name}/{path.name} (ORT run a no-op)",
        "",
        "| batch | us per step (median of 7) | min |",
        "|---:|---:|---:|",
    ]
    for batch in batches:
        prompts = rng.integers(0, model.metadata.vocab_size - 1, size=(batch, 32)).tolist()
        for _ in common.runtime_tokens(model, prompts, 2):  # real logits in the step buffers
            pass
        session.run_with_iobinding = lambda *args, **kwargs: None
        try:
            per_step = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in common.runtime_tokens(model, prompts, steps + 1):
                    pass
                per_step.append((time.perf_counter() - start) / steps * 1e6)
        finally:
            session.run_with_iobinding = real_run
        lines.append(f"| {batch} | {np.median(per_step):.1f} | {min(per_step):.1f} |")
    return "\n".join(lines) + "\n"


def load_cost(path: Path, threads: int, repeats: int = 3) -> str:
    """Creating the session the runtime would (through its graph cache when that applies), with
    ONNX Runtime's weight prepacking on and off, each in a fresh process: what a cold start
    spends in ORT, and the peak memory the prepacked copies add."""
    import subprocess

    import runtime.model

    runtime.model.load(path, threads=threads)  # builds the graph-cache entry if there is one
    rows = []
    for prepack in (True, False):
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, __file__, str(path), "--load-child", "on" if prepack else "off"],
                check=True,
                capture_output=True,
                text=True,
            )
            runs.append(json.loads(out.stdout.splitlines()[-1]))
        init = float(np.median([r["init_s"] for r in runs]))
        rss = float(np.median([r["session_rss_mib"] for r in runs]))
        rows.append(f"| {'on (default)' if prepack else 'off'} | {init:.3f} | {rss:.0f} |")
    return (
        "\n".join(
            [
                f"## Session creation: {path.parent.name}/{path.name} (median of {repeats} processes)",
                "",
                "| ORT weight prepacking | session init s | peak RSS added by the session, MiB |",
                "|---|---:|---:|",
                *rows,
            ]
        )
        + "\n"
    )


def _load_child(path: Path, prepack: bool, threads: int) -> None:
    """One session over what runtime.load opens (the graph-cache entry when there is one)."""
    import onnxruntime as ort

    from runtime import graph_cache

    entry = graph_cache.Entry(path)
    source, level = path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if graph_cache.enabled(path) and entry.is_current():
        source, level = entry.model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    before = _peak_rss_mib()
    start = time.perf_counter()
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    init = time.perf_counter() - start
    print(json.dumps({"init_s": init, "session_rss_mib": _peak_rss_mib() - before}))


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _inference_session(model, kind: type):
    """The onnxruntime.InferenceSession inside a runtime Model (searched, not assumed)."""
    seen = [model]
    for obj in seen:
        for value in vars(obj).values():
            if isinstance(value, kind):
                return value
            if hasattr(value, "__dict__") and len(seen) < 50 and value not in seen:
                seen.append(value)
    raise RuntimeError("no onnxruntime.InferenceSession found inside the runtime Model")


def render(p: dict, top: int) -> str:
    wall, run, kernels = p["wall_ms"], p["ort_run_ms"], p["kernel_ms"]
    lines = [
        f"### Decode step at cache length ~{p['position']} ({p['steps']} steps profiled)",
        "",
        "| part of one step (medians; profiling on) | ms | % of step |",
        "|---|---:|---:|",
    ]
    parts = [
        ("whole step, token to token", wall),
        ("  ONNX Runtime run (model_run)", run),
        ("    kernels (sum of node times)", kernels),
        ("    ORT between kernels (scheduling, allocation, profiler)", run - kernels),
        ("  outside ORT (feeds/binding, logits out, sampling, Python loop)", wall - run),
    ]
    for name, ms in parts:
        lines.append(f"| {name} | {ms:.3f} | {100 * ms / wall:.1f} |")
    lines += [
        "",
        "| op type | nodes per step | ms per step (mean) | % of kernel time |",
        "|---|---:|---:|---:|",
    ]
    for op, (ms, count) in sorted(p["ops"].items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {op} | {count} | {ms:.3f} | {100 * ms / p['kernel_mean_ms']:.1f} |")
    lines += [
        "",
        f"Top {top} nodes:",
        "",
        "| node | ms per step | % of kernel time |",
        "|---|---:|---:|",
    ]
    for name, ms in sorted(p["nodes"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{name}` | {ms:.3f} | {100 * ms / p['kernel_mean_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="an exported .onnx (default: --shape)")
    parser.add_argument("--shape", default="gpt2", help="benchmark shape when no model is given")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument(
        "--kv-cache",
        choices=KV_CACHE_MODES,
        default=KV_CONCAT,
        help=f"which export of the shape: the default ({KV_CONCAT}) or --kv-cache {KV_INPLACE}",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        help="with --kv-cache inplace: the export whose cache is stored in this type",
    )
    parser.add_argument(
        "--positions", type=_csv_ints, help="cache lengths to profile (default 16 and near block)"
    )
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled per position")
    parser.add_argument("--top", type=int, default=12, help="how many single nodes to list")
    parser.add_argument(
        "--python-only",
        action="store_true",
        help="instead: time the runtime's loop with ONNX Runtime's run a no-op (in-place exports)",
    )
    parser.add_argument(
        "--batch", type=_csv_ints, default=[1, 8], help="batch sizes for --python-only"
    )
    parser.add_argument(
        "--load",
        action="store_true",
        help="instead: session creation time and memory with ORT's weight prepacking on and off",
    )
    parser.add_argument("--load-child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, default=common.DEFAULT_WORK_DIR)
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)

    path = args.model
    if args.load_child:
        return _load_child(path, args.load_child == "on", common.THREADS)
    if path is None:
        if args.kv_cache_dtype and args.kv_cache != KV_INPLACE:
            parser.error("--kv-cache-dtype needs --kv-cache inplace")
        name = artifact_name(args.precision, args.kv_cache, args.kv_cache_dtype)
        manifest = prepare_artifacts(args.shape, args.work_dir, artifacts=[name])
        path = Path(manifest["exports"][name]["path"])
    if args.python_only:
        text = python_cost(path, args.batch, max(args.steps, 128), common.THREADS)
    elif args.load:
        text = load_cost(path, common.THREADS)
    else:
        sections = [f"## Decode-step profile: {path} ({common.THREADS} threads)", ""]
        for result in profile(path, args.positions, args.steps, common.THREADS):
            sections.append(render(result, args.top))
        text = "\n".join(sections)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
