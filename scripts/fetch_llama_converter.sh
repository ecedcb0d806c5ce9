#!/usr/bin/env bash
# Fetch llama.cpp's Hugging Face -> GGUF converter into DEST, from PyPI only.
#
#   bash scripts/fetch_llama_converter.sh DEST        # then:
#   gptkit export hf-dir --format hf
#   python DEST/convert_hf_to_gguf.py hf-dir --outtype f16 --outfile model.gguf
#
# llama.cpp is not on PyPI as Python, but the llama-cpp-python source distribution vendors it
# (vendor/llama.cpp, commit 0c1e57098). Only the converter is kept: convert_hf_to_gguf.py, the
# `conversion` package it imports, and the vendored `gguf-py` (gguf 0.19.0), which the converter
# puts first on sys.path, so the PyPI `gguf` package is not needed. The converter needs torch,
# transformers, numpy, pyyaml, tqdm, requests and regex (all in gptkit's train+dev install).
#
# One patch is applied, marked "gptkit patch": the converter names a BPE vocabulary's
# pre-tokenizer by hashing the ids of a check text, so every newly trained vocabulary (every
# gptkit tokenizer) is "not recognized". The patch lets an unknown hash through as "gpt-2" only
# when the tokenizer has no normalizer and its pre-tokenizer cuts that check text into exactly the
# pieces GPT-2's regex does: then llama.cpp's GPT-2 pre-tokenizer is the right one.
#
# Idempotent: a DEST holding this version is left as it is. Set PYTHON to choose the interpreter
# whose pip downloads (default: python3).
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
STAMP=.gptkit-llama-converter

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
dest=$1
python=${PYTHON:-python3}

if [[ -f "$dest/$STAMP" && "$(cat "$dest/$STAMP")" == "llama-cpp-python==$VERSION" ]]; then
    echo "llama.cpp converter already in $dest"
    exit 0
fi
if [[ -e "$dest" && -n "$(ls -A "$dest")" ]]; then
    echo "$dest exists and holds something else; remove it or choose another DEST" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/llama-converter.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== downloading llama-cpp-python==$VERSION (source distribution, ~77 MB)"
# `--no-binary llama-cpp-python`, not `:all:`: pip prepares the sdist's metadata in an isolated
# build environment, and `:all:` would build all of that environment's tools from source too
# (9.5 minutes instead of ~12 s, measured); the sdist itself is then checked by its hash.
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$work/dl"
sdist="$work/dl/llama_cpp_python-$VERSION.tar.gz"
echo "$SHA256  $sdist" | sha256sum --check --quiet

top="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar -xzf "$sdist" -C "$work" \
    "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"

"$python" - "$work/$top/conversion/base.py" <<'PY'
import sys
from pathlib import Path

path = Path(sys.argv[1])
source = path.read_text(encoding="utf-8")
start = source.index("# Marker: Start get_vocab_base_pre")
end = source.index("# Marker: End get_vocab_base_pre")
anchor = "        if res is None:\n"
if source.count(anchor, start, end) != 1:
    sys.exit(f"{path}: get_vocab_base_pre changed upstream; the gptkit patch needs updating")
check = """\
        # gptkit patch (scripts/fetch_llama_converter.sh): a newly trained byte-level BPE has a
        # hash of its own; if it pre-tokenizes the check text exactly as GPT-2 does, it is "gpt-2".
        if res is None and _gptkit_splits_like_gpt2(tokenizer, chktxt):
            logger.info("gptkit patch: unknown BPE hash, pre-tokenizer splits like GPT-2's: 'gpt-2'")
            res = "gpt-2"
"""
helper = '''

# gptkit patch (scripts/fetch_llama_converter.sh)
_GPTKIT_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""


def _gptkit_splits_like_gpt2(tokenizer, text: str) -> bool:
    """True when the HF tokenizer normalizes nothing and pre-tokenizes `text` exactly as GPT-2
    does: its regex's pieces, each in GPT-2's byte-to-unicode alphabet, nothing added."""
    import regex

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return False
    byte_values = [*range(33, 127), *range(161, 173), *range(174, 256)]
    to_text = {b: chr(b) for b in byte_values}
    to_text.update((b, chr(256 + n)) for n, b in enumerate(sorted(set(range(256)) - set(byte_values))))
    gpt2 = ["".join(to_text[b] for b in piece.encode("utf-8"))
            for piece in regex.findall(_GPTKIT_GPT2_SPLIT, text)]
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)] == gpt2
'''
at = source.index(anchor, start, end)
path.write_text(source[:at] + check + source[at:] + helper, encoding="utf-8")
PY

# Staged beside DEST and renamed into place, so an interrupted run leaves no half-filled DEST.
mkdir -p "$(dirname "$dest")"
stage=$(mktemp -d "$dest.partial.XXXXXX")
chmod 755 "$stage"
trap 'rm -rf "$work" "$stage"' EXIT
mv "$work/$top/convert_hf_to_gguf.py" "$work/$top/conversion" "$work/$top/gguf-py" \
    "$work/$top/LICENSE" "$stage/"
echo "llama-cpp-python==$VERSION" >"$stage/$STAMP"
[[ -d "$dest" ]] && rmdir "$dest"
mv "$stage" "$dest"
echo "llama.cpp converter in $dest: GPTKIT_LLAMA_CONVERTER=$dest/convert_hf_to_gguf.py"
