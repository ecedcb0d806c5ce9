"""Decode benchmark: the gptkit runtime against PyTorch, Hugging Face, onnxruntime-genai and the
memory-bandwidth floor, on the same random-init weights and the same prompt, in one run.

    python benchmarks/decode.py                       # tiny, small-cpu, gpt2; batch 1 and 8
    python benchmarks/decode.py --quick               # tiny, batch 1, fewer runs (a smoke run)
    python benchmarks/decode.py --shapes gpt2 --batch 1 --runs 5 --out /tmp/gpt2.md

Workload: a fixed random 32-token prompt (numpy seed 1234; row i is the same for every batch size),
greedy, exactly 128 new tokens (no end-of-text stop), 2 intra-op threads everywhere. Weights are
random-init (torch seed 0); decode speed does not depend on the values.

Every system runs in its own fresh subprocess, so its peak RSS and cold start are its own:

    gptkit, gptkit-int8,  runtime.load(file, threads=2), Model.generate_tokens, on the default
      gptkit-int4         export (standard ONNX; the graph concatenates the cache), fp32 / int8 /
                          int4 (`--quantize int4`: MatMulNBits, needs ONNX Runtime)
    gptkit-inplace,       the same on the `--kv-cache inplace` export (ORT GroupQueryAttention;
      gptkit-inplace-int8, the runtime binds one past/present buffer per layer, written in place)
      gptkit-inplace-int4
    ortloop               a plain numpy + onnxruntime loop over the fp32 export (what the runtime adds)
    torch                 gpt_core.model.GPT, eager, with its KV cache (past_key_values)
    hf                    transformers GPT2LMHeadModel.generate(use_cache=True), same weights
    genai, genai-int8,    onnxruntime-genai (model type "decoder") on the default exports
      genai-int4          (past_present_share_buffer false)
    genai-inplace,        onnxruntime-genai on the in-place exports with past_present_share_buffer
      genai-inplace-int8, true (one max_length buffer per layer, bound as both past and present)
      genai-inplace-int4
    llama-f32, llama-q8_0, llama.cpp's llama-bench and llama-completion on GGUF conversions of the
      llama-q4_0,         same weights (benchmarks/_llamacpp.py; batch 1; only with
      llama-q4_K_M        --llama-cpp DIR, a llama.cpp build: see benchmarks/README.md)

Each gptkit row is compared with genai on the same file. The summary and the targets use gptkit's
faster variant (default or in-place export) per shape, batch and precision, and say which it is.

Definitions: TTFT = prompt prefill plus choosing the first token; decode tok/s = batch x 127 /
(total - TTFT); step ms = (total - TTFT) / 127; cold start = from spawning a new process to the
first token (interpreter, imports, load, prefill; the model file is in the page cache); per-step
latency at position P = median time of one decode step with a cache of about P tokens (batch 1);
peak RSS = VmHWM of the system's process. Every figure is the median of --runs generations after
one warm-up (the warm-up is the cold-start run); generations shorter than
_worker.MIN_MEASURED_S are repeated more often (up to _worker.MAX_RUNS), so a small model's
figures are not a handful of very short samples. The floor is batch x measured read bandwidth /
weight bytes one step reads (_common.weight_bytes).

The modules beside this one, by job: _common (the workload), _machine (bandwidth, CPU time,
memory), _artifacts (weights, exports, genai_config.json), _systems (one adapter per system),
_worker (the subprocess that times one of them), _orchestrator (the plan, one worker per
measurement), _results / _report / _targets (the markdown report). profile_step.py shares the
first three.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _common as common
from _orchestrator import Plan, run_benchmark
from _report import Report
from _systems import SYSTEMS

HERE = Path(__file__).resolve().parent


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", type=_csv(str), help="default tiny,small-cpu,gpt2 (--quick: tiny)"
    )
    parser.add_argument("--batch", type=_csv(int), help="batch sizes, default 1,8 (--quick: 1)")
    parser.add_argument(
        "--systems",
        type=_csv(str),
        default=list(SYSTEMS),
        help="default: all of " + ",".join(SYSTEMS),
    )
    parser.add_argument(
        "--runs", type=int, help="timed runs per figure after one warm-up (default 3, --quick 2)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="fresh processes per system and batch, interleaved across systems; each figure "
        "comes from the round with the median decode speed (default 1)",
    )
    parser.add_argument(
        "--cold-runs", type=int, help="extra fresh processes for gptkit's cold start (default 2)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "RESULTS.md",
        help="markdown report (default benchmarks/RESULTS.md)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, batch 1, 2 runs")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=common.DEFAULT_WORK_DIR,
        help=f"weights and exports (default {common.DEFAULT_WORK_DIR})",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="re-create weights and exports even if cached"
    )
    parser.add_argument(
        "--genai-python",
        help="interpreter with onnxruntime_genai (default: this one, then benchmarks/.venv-genai)",
    )
    parser.add_argument(
        "--llama-cpp",
        metavar="DIR",
        help="llama.cpp build directory (bin/llama-completion, llama-bench, llama-quantize): adds "
        "the llama-f32/q8_0/q4_0/q4_K_M rows at batch 1 (benchmarks/_llamacpp.py)",
    )
    args = parser.parse_args(argv)

    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(
            f"unknown system(s) {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}"
        )
    plan = Plan(
        shapes=args.shapes or (["tiny"] if args.quick else ["tiny", "small-cpu", "gpt2"]),
        batches=args.batch or ([1] if args.quick else [1, 8]),
        systems=[s for s in SYSTEMS if s in args.systems],  # torch first: the greedy reference
        runs=args.runs or (2 if args.quick else 3),
        cold_runs=args.cold_runs if args.cold_runs is not None else (1 if args.quick else 2),
        probe_repeats=1 if args.quick else 2,
        work_dir=args.work_dir,
        rebuild=args.rebuild,
        genai_python=args.genai_python,
        llama_cpp=str(Path(args.llama_cpp).resolve()) if args.llama_cpp else None,
        rounds=max(1, args.rounds),
    )
    data = run_benchmark(plan, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report = Report(data).render()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
