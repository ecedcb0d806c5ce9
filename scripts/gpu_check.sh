#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, set up an environment with CUDA PyTorch and
# onnxruntime-gpu, train a few bf16 steps, export fp16 with both KV-cache kinds, check parity and
# greedy agreement on CUDA, and time decoding there.
#
#   bash scripts/gpu_check.sh [WORK_DIR]              # default WORK_DIR: ./gpu-check
#
# Steps (each prints a "== " header; the first failure ends the script with one
# "gpu_check: FAIL: ..." line on stderr and exit status 1):
#   0. an NVIDIA GPU is visible (nvidia-smi -L)
#   1. a venv (VENV, default WORK_DIR/venv; reused when it exists): PyTorch (TORCH_SPEC from
#      TORCH_INDEX_URL: your choice of CUDA build, see below), gptkit[train] from this checkout,
#      then onnxruntime swapped for onnxruntime-gpu (ORT_GPU_SPEC); the CUDA/cuDNN libraries of
#      the nvidia-* wheels go on LD_LIBRARY_PATH for onnxruntime
#   2. preflight: PyTorch sees the GPU, onnxruntime-gpu starts its CUDA provider on a tiny graph
#   3. gptkit train --device cuda --precision bf16 --max-steps STEPS (bundled Tiny Shakespeare,
#      preset PRESET)
#   4. gptkit export: fp32 (the reference, default cache) and fp16 with --kv-cache concat and
#      inplace; each export runs its own parity check (on the CPU) before it is written
#   5. scripts/gpu_check.py check: per file, on CUDA, the export's parity check against PyTorch
#      (fp16 tolerance 0.2; argmax agreement; greedy vs PyTorch), greedy agreement with the fp32
#      file on the CPU, decode tok/s and TTFT at batch 1 and 8 (32 prompt ids, 128 new tokens);
#      figures also in WORK_DIR/gpu_check.json
#   6. the CLI end to end: gptkit run --device cuda (fp16 in-place file) and --device cpu (fp32
#      file), greedy, the two continuations compared
#
# Environment:
#   PYTHON           interpreter that creates the venv (>= 3.11; default python3)
#   VENV             venv directory (default WORK_DIR/venv)
#   TORCH_INDEX_URL  where pip finds PyTorch. Unset: PyPI, whose Linux x86_64 torch wheels are
#                    CUDA 12 builds (they bring the nvidia-* CUDA and cuDNN wheels onnxruntime-gpu
#                    also uses). For a specific CUDA build use PyTorch's index, e.g.
#                    https://download.pytorch.org/whl/cu126 (match your driver: nvidia-smi shows
#                    the highest CUDA version it supports). onnxruntime-gpu on PyPI needs CUDA 12
#                    and cuDNN 9.
#   TORCH_SPEC       pip requirement for PyTorch (default: torch)
#   ORT_GPU_SPEC     pip requirement for ONNX Runtime (default: onnxruntime-gpu)
#   PRESET           model preset to train (default small-cpu); STEPS: optimizer steps (default 20)
#   SKIP_INSTALL=1   use VENV as it is (no pip)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mkdir -p "${1:-gpu-check}" && cd "${1:-gpu-check}" && pwd)
VENV=${VENV:-$WORK/venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch}
ORT_GPU_SPEC=${ORT_GPU_SPEC:-onnxruntime-gpu}
PRESET=${PRESET:-small-cpu}
STEPS=${STEPS:-20}
STEP="setup"

fail() {
    echo "gpu_check: FAIL: $*" >&2
    exit 1
}
on_error() {
    local status=$?
    echo "gpu_check: FAIL: step \"$STEP\" exited with status $status (see above)" >&2
    exit 1
}
trap on_error ERR
step() {
    STEP=$1
    echo
    echo "== $STEP"
}

step "0. NVIDIA GPU"
command -v nvidia-smi >/dev/null 2>&1 || fail "no NVIDIA GPU: nvidia-smi not found (no driver)"
gpus=$(nvidia-smi -L 2>/dev/null || true)
[[ $gpus == *GPU* ]] || fail "no NVIDIA GPU: nvidia-smi -L lists none"
echo "$gpus"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

step "1. environment ($VENV)"
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
    pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet)
    "${pip[@]}" --upgrade pip
    if [[ -n ${TORCH_INDEX_URL:-} ]]; then
        "${pip[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
    else
        "${pip[@]}" "$TORCH_SPEC"
    fi
    "${pip[@]}" -e "${ROOT}[train]"
    # gptkit depends on `onnxruntime`; onnxruntime-gpu is the same module with the CUDA provider.
    # Both installed would overwrite each other's files: remove both, then install the GPU one.
    "$VENV/bin/python" -m pip uninstall --disable-pip-version-check --quiet -y \
        onnxruntime onnxruntime-gpu
    "${pip[@]}" "$ORT_GPU_SPEC"
fi
py=$VENV/bin/python
gptkit=$VENV/bin/gptkit
[[ -x $py && -x $gptkit ]] || fail "$VENV has no python or gptkit (run without SKIP_INSTALL=1)"
# onnxruntime-gpu loads libcudnn/libcublas by name: point it at the nvidia-* wheels' copies.
nvlibs=$("$py" - <<'PY'
import glob
import os
import site

dirs = {
    os.path.dirname(p)
    for base in site.getsitepackages()
    for p in glob.glob(os.path.join(base, "nvidia", "*", "lib", "lib*.so*"))
}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${nvlibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$py" -m pip list --disable-pip-version-check 2>/dev/null | grep -Ei '^(torch|onnxruntime|onnx|numpy) ' || true

step "2. preflight"
"$py" "$ROOT/scripts/gpu_check.py" preflight || exit 1 # it printed its one FAIL line

step "3. train $STEPS bf16 steps on CUDA (preset $PRESET)"
rm -rf "$WORK/run"
"$gptkit" train --device cuda --precision bf16 --max-steps "$STEPS" --eval-interval 10 \
    --preset "$PRESET" --out "$WORK/run"

step "4. export fp32 (reference) and fp16 with both cache kinds"
"$gptkit" export "$WORK/fp32.onnx" --checkpoint "$WORK/run"
for kind in concat inplace; do
    "$gptkit" export "$WORK/fp16-$kind.onnx" --checkpoint "$WORK/run" --dtype fp16 \
        --kv-cache "$kind"
done

step "5. parity, greedy agreement and decode speed on CUDA"
"$py" "$ROOT/scripts/gpu_check.py" check --checkpoint "$WORK/run" --reference "$WORK/fp32.onnx" \
    --json "$WORK/gpu_check.json" \
    "$WORK/fp16-concat.onnx" "$WORK/fp16-inplace.onnx" "$WORK/fp32.onnx"

step "6. gptkit run --device cuda against --device cpu"
prompt=$'ROMEO:\n'
"$gptkit" run -m "$WORK/fp16-inplace.onnx" --device cuda -p "$prompt" -t 0 -n 48 \
    >"$WORK/run-cuda.txt"
"$gptkit" run -m "$WORK/fp32.onnx" --device cpu -p "$prompt" -t 0 -n 48 >"$WORK/run-cpu.txt"
if cmp -s "$WORK/run-cuda.txt" "$WORK/run-cpu.txt"; then
    echo "gptkit run: fp16 in-place on CUDA and fp32 on the CPU wrote the same 48 greedy tokens"
else
    echo "gptkit run: the continuations differ (fp16 rounding flips near-ties of a 20-step model):"
    echo "--- cuda fp16:"
    cat "$WORK/run-cuda.txt"
    echo "--- cpu fp32:"
    cat "$WORK/run-cpu.txt"
fi

echo
echo "gpu_check: OK (figures in $WORK/gpu_check.json)"
