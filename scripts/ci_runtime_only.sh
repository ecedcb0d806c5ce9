#!/usr/bin/env bash
# Proof that the runtime needs no PyTorch: build a clean virtual environment with only
# `pip install .` (numpy, onnxruntime, tiktoken, click) plus the two test tools, check that torch
# is absent, then run `gptkit run` and the runtime tests against a model exported earlier in the
# same CI run; then add the serve extra (still no torch) and ask `gptkit serve` for a completion.
#
#   scripts/ci_runtime_only.sh path/to/model.onnx [venv-dir]
#
# The tests run from a scratch directory, so they import the installed package, not the checkout.
set -euo pipefail

if [[ $# -lt 1 || ! -f $1 ]]; then
    echo "usage: $0 MODEL.onnx [VENV_DIR]  (MODEL.onnx: a model exported earlier in this run)" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
model=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gptkit-runtime-ci.XXXXXX")
venv=${2:-$scratch/venv}
python=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '\n== %s\n' "$*" >&2; }

step "clean venv at $venv: pip install . (no extras)"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet "$root"
"$venv/bin/pip" install --quiet pytest hypothesis # test tools only

step "torch must be absent"
if "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    echo "FAIL: torch is importable in the runtime-only venv" >&2
    exit 1
fi
"$venv/bin/pip" list --format=freeze | grep -i '^torch' && { echo "FAIL: torch installed" >&2; exit 1; }
echo "torch: absent" >&2

cd "$scratch"
step "gptkit run against $model"
"$venv/bin/gptkit" run --model "$model" --prompt "ROMEO:" --max-new-tokens 20 --seed 0 | tee run.txt
test -s run.txt || { echo "FAIL: gptkit run printed nothing" >&2; exit 1; }
echo "To be, or not to be" | "$venv/bin/gptkit" run --model "$model" --prompt - --echo \
    --temperature 0 --max-new-tokens 10
"$venv/bin/python" - "$model" <<'EOF'
import sys

import runtime

assert "site-packages" in runtime.__file__, runtime.__file__  # the installed package
model = runtime.load(sys.argv[1])
print(model, "->", repr(model.generate("ROMEO:", max_new_tokens=10, temperature=0)))
assert "torch" not in sys.modules
EOF

step "runtime tests (torch-free) against $model"
GPTKIT_TEST_MODEL="$model" GPTKIT_REQUIRE_MODEL=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    "$root/tests/test_sampling.py" "$root/tests/test_runtime.py" "$root/tests/test_run_cli.py" \
    "$root/tests/test_graph_cache.py" "$root/tests/test_prefill_chunks.py" \
    "$root/tests/test_doctests.py"

step "pip install '.[serve]' (still no torch), then gptkit serve answers a completion"
"$venv/bin/pip" install --quiet "$root[serve]"
"$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    || { echo "FAIL: the serve extra pulled in torch" >&2; exit 1; }
port=$("$venv/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$venv/bin/gptkit" serve "$model" --port "$port" >serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 $server 2>/dev/null || { cat serve.log >&2; echo "FAIL: gptkit serve exited" >&2; exit 1; }
    sleep 0.5
done
curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}' | tee completion.json
"$venv/bin/python" -c "import json; r = json.load(open('completion.json')); assert r['usage']['completion_tokens'] >= 1, r"
kill -TERM $server
wait $server || { cat serve.log >&2; echo "FAIL: gptkit serve did not exit 0 on SIGTERM" >&2; exit 1; }
trap - EXIT
echo "gptkit serve: ok (torch-free)" >&2
