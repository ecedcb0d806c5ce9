"""The decode benchmark's plan and its run: one fresh worker process per measurement.

``run_benchmark`` measures the machine, has a worker prepare each shape's files, then spawns one
``_worker.py`` process per system and batch size and collects their results into one dict, which
``_report.Report`` renders.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as common
import _machine
from _artifacts import ARTIFACTS
from _results import load_mark
from _systems import SYSTEMS

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_worker.py"
GENAI_VENV_PYTHON = HERE / ".venv-genai" / "bin" / "python"


def _python_for(system: str, genai_python: str | None) -> str | None:
    """The interpreter to run ``system`` with (None: not available here)."""
    if not system.startswith("genai"):
        return sys.executable
    candidates = [genai_python] if genai_python else [sys.executable, str(GENAI_VENV_PYTHON)]
    for python in candidates:
        if python and Path(python).exists() and _has_module(python, "onnxruntime_genai"):
            return python
    return None


def _has_module(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def _spawn(python: str, args: list[str], timeout: float) -> dict:
    """Run ``_worker.py`` in a fresh process with ``args``; parse the one RESULT line it prints."""
    env = dict(os.environ)
    for var in common.THREAD_VARS:
        env[var] = str(common.THREADS)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE.parent), str(HERE), env.get("PYTHONPATH")) if p
    )
    busy, children = _machine.machine_busy_cpu_s(), _machine.children_cpu_s()
    t_spawn = time.time()
    proc = subprocess.run(
        [python, str(WORKER), *args, "--t-spawn", repr(t_spawn)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    wall = time.time() - t_spawn
    busy_after = _machine.machine_busy_cpu_s()
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            if busy is not None and busy_after is not None and wall > 0:
                # Cores kept busy by anything but this process (other users of the VM, the host):
                # machine busy time minus the worker's own CPU time, over its wall time.
                other = (busy_after - busy) - (_machine.children_cpu_s() - children)
                result["other_cpu_cores"] = max(0.0, other / wall)
            return result
    lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
    return {"error": lines[-1].strip() if lines else f"exit status {proc.returncode}"}


@dataclass
class Plan:
    """What to measure and how often (decode.py fills it from its flags)."""

    shapes: list[str]
    batches: list[int]
    systems: list[str]
    runs: int
    cold_runs: int
    probe_repeats: int
    work_dir: Path
    rebuild: bool
    genai_python: str | None
    llama_cpp: str | None = None  # llama.cpp build directory (decode.py --llama-cpp)
    rounds: int = 1  # fresh processes per system and batch, interleaved (decode.py --rounds)
    timeout: float = 900.0
    notes: list[str] = field(default_factory=list)


def run_benchmark(plan: Plan, log) -> dict:
    """Every measurement of ``plan``, as the dict ``_report.Report`` renders; progress to ``log``."""
    started = time.perf_counter()
    info = _machine.machine_info()
    log(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_avg'][0]:.2f}")
    log("measuring memory bandwidth and GEMM throughput ...")
    bandwidth = _machine.measure_bandwidth(256 if plan.runs <= 2 else 512)
    gflops = _machine.measure_gemm_gflops()
    log(
        "  "
        + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items())
        + f"; sgemm {gflops:.0f} GFLOP/s"
    )
    pythons = {s: _python_for(s, plan.genai_python) for s in plan.systems}
    for system, python in pythons.items():
        if python is None:
            plan.notes.append(
                f"{system}: skipped, onnxruntime_genai is not importable (see benchmarks/README.md)"
            )
    llama = [s for s in plan.systems if s.startswith("llama-")]
    if llama and plan.llama_cpp is None:
        plan.notes.append(f"{', '.join(llama)}: skipped, no llama.cpp build (--llama-cpp DIR)")
    shapes = {}
    for shape in plan.shapes:
        log(f"[{shape}] preparing weights and exports in {plan.work_dir / shape} ...")
        artifacts = [a for a in ARTIFACTS if any(SYSTEMS[s][1] == a for s in plan.systems)]
        args = ["--prepare", shape, "--work-dir", str(plan.work_dir)]
        warm = [SYSTEMS[s][1] for s in plan.systems if s.startswith("gptkit")]
        args += ["--artifacts", ",".join(artifacts), "--warm", ",".join(warm)]
        manifest = _spawn(
            sys.executable, args + (["--rebuild"] if plan.rebuild else []), plan.timeout
        )
        if "error" in manifest:
            raise SystemExit(f"[{shape}] preparing artifacts failed: {manifest['error']}")
        for name, export in manifest["exports"].items():
            log(f"  {name}: {export['megabytes']} MB via {export['exporter']}")
        if manifest.get("warmed"):
            plan.notes.append(
                f"{shape}: each gptkit file was loaded once with runtime.load before the timed "
                "runs, so the runtime's optimised-graph cache (runtime.graph_cache, large models "
                "only) is as `gptkit export` leaves it: " + "; ".join(manifest["warmed"])
            )
        manifest_path = str(plan.work_dir / shape / "manifest.json")
        rows = []
        for batch in plan.batches:
            measured: dict[str, list[dict]] = {}
            # Rounds interleave the systems (A, B, C, A, B, C, ...), so a slow spell of the
            # machine falls on all of them rather than on whichever ran then.
            for round_index in range(plan.rounds):
                for system in plan.systems:
                    python = pythons[system]
                    if python is None:
                        continue
                    if system.startswith("llama-") and (plan.llama_cpp is None or batch != 1):
                        continue
                    spec = {
                        "system": system,
                        "manifest": manifest_path,
                        "batch": batch,
                        "runs": plan.runs,
                        "probe": batch == 1 and round_index == 0,
                        "probe_repeats": plan.probe_repeats,
                        "llama_cpp": plan.llama_cpp,
                    }
                    result = _spawn(python, ["--worker", json.dumps(spec)], plan.timeout)
                    result.update(system=system, batch=batch)
                    if round_index == 0:
                        _add_cold_starts(result, python, spec, plan)
                    if plan.rounds > 1:
                        log(f"  round {round_index + 1}: " + _one_line(shape, result))
                    measured.setdefault(system, []).append(result)
            for results in measured.values():
                result = _median_round(results)
                log("  " + _one_line(shape, result))
                rows.append(result)
        shapes[shape] = {"manifest": manifest, "results": rows}
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": info,
        "bandwidth": bandwidth,
        "gemm_gflops": gflops,
        "plan": {
            "runs": plan.runs,
            "cold_runs": plan.cold_runs,
            "batches": plan.batches,
            "rounds": plan.rounds,
        },
        "shapes": shapes,
        "notes": plan.notes,
        "seconds": time.perf_counter() - started,
        "load_avg_end": os.getloadavg(),
    }


def _add_cold_starts(result: dict, python: str, spec: dict, plan: Plan) -> None:
    """gptkit's cold start at batch 1: the median over the worker and plan.cold_runs more."""
    if spec["batch"] != 1 or not spec["system"].startswith("gptkit") or "error" in result:
        return
    colds = [result["cold_start_s"]]
    for _ in range(plan.cold_runs):
        extra = _spawn(python, ["--worker", json.dumps({**spec, "cold_only": True})], plan.timeout)
        if "cold_start_s" in extra:
            colds.append(extra["cold_start_s"])
    result["cold_start_samples"] = colds
    result["cold_start_s"] = common.median(colds)


def _median_round(results: list[dict]) -> dict:
    """One system's figures from the round with the median decode speed (the first round keeps
    the probes and cold starts, which are measured once), with every round's tok/s beside them."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    ranked = sorted(ok, key=lambda r: r["decode_tok_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    first = ok[0]
    for key in ("probe_ms", "peak_rss_full_context_mb", "cold_start_s", "cold_start_samples"):
        if key in first:
            chosen[key] = first[key]
    if len(results) > 1:
        chosen["round_tok_s"] = [r.get("decode_tok_s") for r in results]
    return chosen


def _one_line(shape: str, r: dict) -> str:
    head = f"{shape:9s} b{r['batch']} {r['system']:19s}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    return (
        f"{head} {r['decode_tok_s']:8.1f} tok/s  step {r['step_ms']:6.2f} ms  "
        f"TTFT {r['ttft_ms']:7.1f} ms  cold {r['cold_start_s']:5.2f} s  RSS {r['peak_rss_mb']:6.0f} MB"
        f"  other load {load_mark(r)}"
    )
