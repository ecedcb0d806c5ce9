"""The checks behind scripts/gpu_check.sh that need Python: is there a usable GPU, and do the
exported files agree with PyTorch and decode fast on it.

    python scripts/gpu_check.py preflight
    python scripts/gpu_check.py check --checkpoint RUN --reference fp32.onnx A.onnx B.onnx ...

``preflight`` prints one line and exits 1 unless PyTorch sees a CUDA device and ONNX Runtime has a
working CUDA execution provider (a tiny session is created on it, not just listed).

``check``, for every MODEL file, on the device (default cuda):

1. **parity**: the export's own check (``export.parity.verify_parity``, the one ``gptkit export``
   runs on the CPU before it publishes a file) with its ONNX Runtime sessions on the device:
   logits and presents at a left-padded prompt and 4 cached steps against PyTorch fp32, with the
   file's tolerance (fp16: 0.2), plus argmax agreement and greedy tokens against PyTorch's own
   cached ``generate``; for ``--kv-cache inplace`` files also the runtime's shared buffer (on CUDA:
   IO binding).
2. **greedy agreement**: GREEDY_TOKENS greedy ids after a text prompt from ``runtime.load(MODEL,
   device=cuda)`` against the fp32 ``--reference`` file on the CPU (the runtime's own loop for
   both), as leading ids identical.
3. **decode timing**: batch 1 and 8, the decode benchmark's workload (32 random prompt ids, 128
   new tokens or what fits in the context, greedy, no end-of-text stop), a warm-up then the median
   of RUNS: decode tok/s = batch x (new tokens - 1) / (total - TTFT), and TTFT.

Exit status 1 when a parity check fails (greedy agreement and speed are reported, not judged: a
20-step model has near-flat logits, where fp16 rounding may flip a near-tie). ``--device cpu``
runs the same checks on the CPU (to test this script without a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

GREEDY_TOKENS = 64
GREEDY_PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
PROMPT_LEN = 32
NEW_TOKENS = 128
RUNS = 3


def fail(message: str) -> None:
    print(f"gpu_check: FAIL: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def preflight() -> None:
    """One line: the GPU and providers, or why not (exit 1)."""
    try:
        import torch
    except ImportError:
        fail("PyTorch is not installed in this environment")
    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no device visible"
        fail(f"PyTorch {torch.__version__} sees no CUDA GPU ({why})")
    try:
        import onnxruntime as ort
    except ImportError:
        fail("onnxruntime is not installed (pip install onnxruntime-gpu)")
    if hasattr(ort, "preload_dlls"):  # the CUDA/cuDNN libraries of the nvidia-* wheels
        ort.preload_dlls()
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        fail(
            f"onnxruntime {ort.__version__} has no CUDA provider ({', '.join(providers)}): "
            "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
        )
    session = _tiny_session(ort)
    if "CUDAExecutionProvider" not in session.get_providers():
        fail(
            f"onnxruntime-gpu {ort.__version__} could not start its CUDA provider (CUDA or cuDNN "
            "libraries missing or of the wrong major version; see its warnings above)"
        )
    name = torch.cuda.get_device_name(0)
    print(
        f"gpu_check: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"onnxruntime-gpu {ort.__version__}, bf16 {torch.cuda.is_bf16_supported()}"
    )


def _tiny_session(ort: Any) -> Any:
    """An InferenceSession of a one-node graph on the CUDA provider (onnx makes the graph)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "gpu_check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(
        model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )


# ---- check --------------------------------------------------------------------------------------


def parity_on(device: str, model: Any, path: Path, variant: str) -> Any:
    """``export.parity.verify_parity`` with its sessions on ``device`` (it opens them with the
    runtime's OnnxSession, which takes the device; nothing else changes)."""
    import export.parity as parity
    from runtime.session import OnnxSession

    class DeviceSession(OnnxSession):
        def __init__(self, file: Any, **options: Any) -> None:
            super().__init__(file, device=device, **options)

    original = parity.OnnxSession
    setattr(parity, "OnnxSession", DeviceSession)  # noqa: B010  (a module global, put back below)
    try:
        return parity.verify_parity(model, path, variant=variant, raise_on_failure=False)
    finally:
        setattr(parity, "OnnxSession", original)  # noqa: B010


def greedy_ids(loaded: Any, prompt: list[int], n: int) -> list[int]:
    stream = loaded.generate_tokens(prompt, max_new_tokens=n, temperature=0.0, stop_at_eot=False)
    return [token.id for token in stream]


def time_decode(loaded: Any, batch: int, runs: int) -> dict[str, float]:
    """Median decode tok/s and TTFT of ``runs`` greedy generations after one warm-up."""
    import numpy as np

    vocab = loaded.tokenizer.n_vocab
    rng = np.random.default_rng(1234)  # the decode benchmark's prompt seed
    rows = rng.integers(0, vocab - 1, size=(batch, PROMPT_LEN)).tolist()
    new_tokens = min(NEW_TOKENS, loaded.block_size - PROMPT_LEN)  # small presets: what fits
    totals, ttfts = [], []
    for run in range(runs + 1):
        start = time.perf_counter()
        first = None
        for _ in loaded.generate_tokens(
            rows, max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False
        ):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        if run and first is not None:  # run 0 is the warm-up
            totals.append(end - start)
            ttfts.append(first - start)
    total, ttft = statistics.median(totals), statistics.median(ttfts)
    return {
        "decode_tok_s": batch * (new_tokens - 1) / (total - ttft),
        "ttft_ms": ttft * 1e3,
        "step_ms": (total - ttft) / (new_tokens - 1) * 1e3,
        "new_tokens": new_tokens,
    }


def check(args: argparse.Namespace) -> int:
    import runtime
    from export.parity import common_prefix
    from gpt_core.checkpoint import load_model, resolve_checkpoint

    device = args.device
    model, tokenizer = load_model(resolve_checkpoint(args.checkpoint))
    model = model.float().cpu().eval()
    reference = runtime.load(args.reference, device="cpu")
    prompt = reference.tokenizer.encode(GREEDY_PROMPT)
    n_greedy = min(args.greedy_tokens, reference.block_size - len(prompt))
    expected = greedy_ids(reference, prompt, n_greedy)
    report: dict[str, Any] = {"device": device, "reference": str(args.reference), "models": {}}
    failed = []
    for path in args.models:
        loaded = runtime.load(path, device=device)
        if loaded.device != device:
            fail(f"{path}: loaded on {loaded.device}, not {device}")
        export = loaded.metadata.export
        variant = export.get("quantize") or export.get("dtype") or "fp32"
        kind = loaded.metadata.kv_cache
        name = f"{Path(path).name} ({variant}, kv-cache {kind}, {device})"
        print(f"== {name}", flush=True)

        parity = parity_on(device, model, Path(path), variant)
        for line in parity.lines():
            print("  " + line)
        if not parity.ok:
            failed.append(f"{name}: parity")

        got = greedy_ids(loaded, prompt, n_greedy)
        same = common_prefix(expected, got)
        print(f"  greedy vs fp32 reference on the CPU: {same}/{len(expected)} leading ids equal")

        timings = {}
        for batch in args.batch:
            t = time_decode(loaded, batch, args.runs)
            timings[str(batch)] = t
            print(
                f"  decode batch {batch}, {t['new_tokens']} new tokens: {t['decode_tok_s']:.1f} tok/s "
                f"(step {t['step_ms']:.2f} ms), TTFT {t['ttft_ms']:.1f} ms"
            )
        report["models"][str(path)] = {
            "variant": variant,
            "kv_cache": kind,
            "parity_ok": parity.ok,
            "parity_worst": parity.worst,
            "parity_tolerance": parity.tolerance,
            "argmax_agreement": parity.argmax_agreement,
            "greedy_vs_pytorch": [parity.greedy_match, parity.greedy_total],
            "greedy_vs_fp32_cpu": [same, len(expected)],
            "decode": timings,
        }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if failed:
        print("gpu_check: FAIL: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("preflight", help="is there a GPU PyTorch and ONNX Runtime can use")
    c = sub.add_parser("check", help="parity, greedy agreement and decode speed on the device")
    c.add_argument("models", nargs="+", type=Path, help="exported .onnx files to check")
    c.add_argument("--checkpoint", required=True, help="the run the files were exported from")
    c.add_argument("--reference", required=True, type=Path, help="the fp32 export (on the CPU)")
    c.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    c.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    c.add_argument("--runs", type=int, default=RUNS)
    c.add_argument("--greedy-tokens", type=int, default=GREEDY_TOKENS)
    c.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.command == "preflight":
        preflight()
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
