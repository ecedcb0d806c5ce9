"""Reliability matrix, runtime side: bad model files, bad generation requests, faults, fuzzing.

Each case names the exact command, the one-line message it must print, the exit code, and what
must be intact afterwards (a model file `gptkit run` read is never modified).
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from hypothesis import example, given
from hypothesis import strategies as st
from reliability_helpers import digest, gptkit, one_line_error, subprocess_error
from runtime_helpers import Exported, prebuilt_or_tiny

import runtime
from gptkit.cli import cli
from runtime.errors import ConfigError, ModelFileError
from runtime.metadata import KEY_CONFIG, KEY_EXPORT, KEY_FORMAT, KEY_TOKENIZER, ModelMetadata
from runtime.sampling import SamplingConfig, choose_token
from runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return prebuilt_or_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def model(exported: Exported) -> runtime.Model:
    return runtime.load(exported.path, threads=1)


@pytest.fixture
def run(runner: CliRunner) -> Callable[..., Result]:
    """``gptkit run ARGS`` through the shared CliRunner."""
    return lambda *args, input=None: runner.invoke(cli, ["run", *args], input=input)


# ---- model files: `gptkit run -m FILE -p x` -------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _tampered(exported: Exported, directory: Path, name: str, **props: object) -> Path:
    """A copy of the export with some metadata properties replaced (dicts merge into the JSON)."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(exported.path))
    for prop in proto.metadata_props:
        if prop.key in props:
            change = props[prop.key]
            if isinstance(change, dict):
                prop.value = json.dumps({**json.loads(prop.value), **change})
            else:
                prop.value = str(change)
    path = directory / name
    onnx.save(proto, str(path))
    return path


def _not_gptkit(exported: Exported, directory: Path) -> Path:
    """A valid ONNX model (one Add node) that gptkit did not export."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [])
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]))
    path = directory / "add.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _truncated(exported: Exported, directory: Path) -> Path:
    data = exported.path.read_bytes()
    return _write(directory / "half.onnx", data[: len(data) // 2])


MODEL_FILE_CASES = [
    # (id, make(exported, tmp_path) -> path, needles)
    ("missing", lambda e, d: d / "nope.onnx", ["not found", "gptkit export"]),
    ("zero-bytes", lambda e, d: _write(d / "empty.onnx", b""), ["is empty (0 bytes)"]),
    ("random-bytes", lambda e, d: _write(d / "r.onnx", os.urandom(4096)), ["not a readable ONNX"]),
    ("truncated-onnx", _truncated, ["not a readable ONNX model"]),
    ("onnx-not-from-gptkit", _not_gptkit, ["no gptkit metadata"]),
    (
        "format-version-2",
        lambda e, d: _tampered(e, d, "v2.onnx", **{KEY_FORMAT: "2"}),
        ["format version '2'", "re-export"],
    ),
    (
        "corrupt-tokenizer",
        lambda e, d: _tampered(e, d, "tok.onnx", **{KEY_TOKENIZER: "{not json"}),
        ["corrupt tokenizer data"],
    ),
    (
        # found a defect: ranks of the wrong JSON type escaped as AttributeError (a traceback)
        "tokenizer-ranks-not-a-string",
        lambda e, d: _tampered(e, d, "ranks.onnx", **{KEY_TOKENIZER: '{"ranks": 5}'}),
        ["corrupt tokenizer data"],
    ),
    (
        "config-not-json",
        lambda e, d: _tampered(e, d, "cfg.onnx", **{KEY_CONFIG: "{n_layer: 2"}),
        ["'gptkit.config' is not valid JSON"],
    ),
    (
        "config-n-layer-0",
        lambda e, d: _tampered(e, d, "l0.onnx", **{KEY_CONFIG: {"n_layer": 0}}),
        ["config field 'n_layer' is missing or invalid"],
    ),
    (
        "metadata-n-layer-not-the-graphs",
        lambda e, d: _tampered(e, d, "l3.onnx", **{KEY_CONFIG: {"n_layer": 3}}),
        ["lacks gptkit's inputs/outputs"],
    ),
    (
        # found a defect: the mismatch surfaced as an onnxruntime InvalidArgument traceback
        "metadata-n-head-not-the-graphs",
        lambda e, d: _tampered(e, d, "h4.onnx", **{KEY_CONFIG: {"n_head": 4}}),
        ["does not match its metadata", "re-export"],
    ),
]


@pytest.mark.parametrize(
    ("make", "needles"),
    [(make, needles) for _, make, needles in MODEL_FILE_CASES],
    ids=[case[0] for case in MODEL_FILE_CASES],
)
def test_bad_model_file_is_one_line_error_and_left_untouched(
    run, exported, tmp_path, make, needles
):
    path = make(exported, tmp_path)
    before = digest(path) if path.exists() else None
    one_line_error(run("-m", str(path), "-p", "ROMEO:", "-n", "4"), *needles)
    with pytest.raises(ModelFileError):  # the API raises the typed error the CLI printed
        runtime.load(path)
    assert (digest(path) if path.exists() else None) == before


def test_model_path_is_a_directory(run, runner: CliRunner, tmp_path: Path):
    """`gptkit run -m DIR` is a usage error (exit 2); `gptkit inspect DIR` and the API say why."""
    result = run("-m", str(tmp_path), "-p", "x")
    one_line_error(result, "is a directory", code=2)
    result = runner.invoke(cli, ["inspect", str(tmp_path)])  # inspect reads directory exports
    one_line_error(result, "is a directory with neither config.json")
    with pytest.raises(ModelFileError, match="is not a file"):
        runtime.load(tmp_path)


def test_block_size_in_metadata_larger_than_the_graph(run, exported: Exported, tmp_path: Path):
    """Found a defect: positions past the graph's wpe crashed mid-stream with an ORT traceback.

    `gptkit run -m big.onnx -p ROMEO: -t 0 -n 80` where the metadata claims a longer context
    than the graph has positions: a one-line error (exit 1), the text so far stays on stdout.
    """
    model = runtime.load(exported.path, threads=1)
    real = model.block_size
    path = _tampered(exported, tmp_path, "big.onnx", **{KEY_CONFIG: {"block_size": 4 * real}})
    result = run("-m", str(path), "-p", "ROMEO:", "-t", "0", "-n", str(2 * real))
    one_line_error(result, "onnxruntime failed running", str(path))
    assert result.stdout  # what was generated before the failure was printed, not lost


# ---- generation requests: `gptkit run -m model.onnx -p ROMEO: ARGS` ----------------------------

GENERATION_ERRORS = [
    ("temperature-negative", ["--temperature", "-1"], "temperature must be >= 0"),
    ("temperature-nan", ["--temperature", "nan"], "temperature must be a number"),
    ("top-p-zero", ["--top-p", "0"], "top_p must be in (0, 1]"),
    ("top-p-over-one", ["--top-p", "1.01"], "top_p must be in (0, 1]"),
    ("top-k-negative", ["--top-k", "-1"], "top_k must be >= 0"),
    ("min-p-negative", ["--min-p", "-0.5"], "min_p must be in [0, 1]"),
    ("min-p-over-one", ["--min-p", "1.5"], "min_p must be in [0, 1]"),
    ("max-new-tokens-zero", ["-n", "0"], "max_new_tokens must be >= 1"),
    ("max-new-tokens-negative", ["-n", "-5"], "max_new_tokens must be >= 1"),
    ("seed-negative", ["--seed", "-1"], "seed must be >= 0"),
    ("stop-empty", ["--stop", ""], "stop strings must be non-empty"),
    ("threads-negative", ["--threads", "-2"], "threads must be positive"),
]


@pytest.mark.parametrize(
    ("args", "needle"),
    [(a, n) for _, a, n in GENERATION_ERRORS],
    ids=[c[0] for c in GENERATION_ERRORS],
)
def test_invalid_generation_request(run, exported: Exported, args, needle):
    result = run("-m", str(exported.path), "-p", "ROMEO:", *args)
    one_line_error(result, needle)
    assert result.stdout == ""  # rejected before anything was generated


def test_prompt_longer_than_block_size(run, exported: Exported, model: runtime.Model):
    prompt = "ROMEO: " * model.block_size
    line = one_line_error(run("-m", str(exported.path), "-p", prompt, "-n", "5"))
    assert "over the model's context of" in line and f"{model.block_size} tokens" in line
    # --context truncate is the documented way out, and it works on the same prompt
    ok = run("-m", str(exported.path), "-p", prompt, "-n", "5", "--context", "truncate")
    assert ok.exit_code == 0 and "tokens in" in ok.stderr


def test_non_integer_flag_is_a_usage_error(run, exported: Exported):
    result = run("-m", str(exported.path), "-p", "x", "--top-k", "many")
    one_line_error(result, "'many' is not a valid integer", code=2)


def test_empty_prompt_starts_a_document(run, exported: Exported, model: runtime.Model):
    result = run("-m", str(exported.path), "-p", "", "-n", "5", "-t", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout == model.generate("", max_new_tokens=5, temperature=0) + "\n"


def test_endoftext_in_the_prompt_is_plain_text(run, exported: Exported, model: runtime.Model):
    prompt = "ROMEO:<|endoftext|>"
    assert model.tokenizer.eot_token not in model.tokenizer.encode(prompt)
    result = run("-m", str(exported.path), "-p", prompt, "-n", "6", "-t", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout == model.generate(prompt, max_new_tokens=6, temperature=0) + "\n"
    assert "<|endoftext|>" not in result.stdout  # never echoed as a control token


def test_non_utf8_on_stdin(run, exported: Exported):
    result = run("-m", str(exported.path), "-p", "-", input=b"RO\xffMEO:")
    one_line_error(result, "standard input is not UTF-8 text", "offset 2")
    assert result.stdout == ""


def test_non_utf8_line_in_interactive_mode(
    exported: Exported, model: runtime.Model, tmp_path: Path
):
    """Found a defect: `printf 'ROMEO:\\nRO\\xffMEO:\\nJULIET:\\n' | gptkit run` under a
    UTF-8 locale (strict stdin) ended in a UnicodeDecodeError traceback and lost every reply.
    Now the bad line gets one Error line naming the byte offset and the loop goes on (exit 0)."""
    proc = gptkit(
        *("run", "-m", str(exported.path), "-t", "0", "-n", "4", "--threads", "1"),
        cwd=tmp_path,
        env={"PYTHONIOENCODING": "utf-8"},  # what a UTF-8 locale gives: strict decoding
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(b"ROMEO:\nRO\xffMEO:\nJULIET:\n", timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
    subprocess_error(done, "not UTF-8 text", "offset 2", code=0)
    assert done.stderr.count("tokens in") == 2
    replies = [model.generate(p, max_new_tokens=4, temperature=0) for p in ("ROMEO:", "JULIET:")]
    assert done.stdout == "".join(reply + "\n" for reply in replies)


def test_stop_string_that_never_occurs(run, exported: Exported, model: runtime.Model):
    args = ("-m", str(exported.path), "-p", "ROMEO:", "-n", "8", "-t", "0")
    plain = run(*args)
    stopped = run(*args, "--stop", "\x07never\x07")
    assert stopped.exit_code == 0 and stopped.stdout == plain.stdout
    assert "; length]" in stopped.stderr or "; eot]" in stopped.stderr


# ---- faults -----------------------------------------------------------------------------------


def test_sigint_while_streaming_keeps_the_output(exported: Exported, model: runtime.Model):
    """`gptkit run -p ROMEO: --seed 3 -n 100000 --context truncate`, then Ctrl-C (SIGINT) once
    text is flowing: exit 130, the text so far on stdout (a prefix of the seeded continuation,
    newline-terminated), `interrupted` in the stats line, no traceback."""
    proc = gptkit(
        "run",
        *("-m", str(exported.path), "-p", "ROMEO:", "--seed", "3", "--threads", "1"),
        *("-n", "100000", "--context", "truncate"),
        cwd=exported.path.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = b""
    deadline = time.monotonic() + 120
    while not first and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            first = os.read(proc.stdout.fileno(), 64)
            if not first:
                break  # EOF: it ended before we could interrupt it
    assert first, "gptkit run printed nothing"
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    out, err = (first + rest).decode(), err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "; interrupted]" in err
    n = int(err.split("[")[-1].split(" tokens")[0])
    assert n >= 1 and out.endswith("\n")
    expected = model.complete(
        "ROMEO:", max_new_tokens=n, seed=3, temperature=0.8, context="truncate"
    ).text
    assert len(out) > 1 and expected.startswith(out[:-1])


def test_eight_threads_mixed_requests_equal_one_thread(model: runtime.Model):
    """8 threads, one Model: greedy, seeded sampling with every processor, a batch, a stream with
    a stop string, context truncation and scoring; results equal the single-threaded ones."""
    prompts = ["ROMEO:", "JULIET:", "To be, or not", "\n"]
    long_prompt = "What light " * model.block_size

    def job(i: int):
        p = prompts[i % len(prompts)]
        kind = i % 6
        if kind == 0:
            return model.generate(p, max_new_tokens=10, temperature=0)
        if kind == 1:
            return model.complete(
                p, max_new_tokens=10, seed=i, top_k=20, top_p=0.9, min_p=0.05,
                repetition_penalty=1.3, stop_at_eot=False,
            ).token_ids  # fmt: skip
        if kind == 2:
            return model.generate(prompts, max_new_tokens=6, seed=i)
        if kind == 3:
            return "".join(model.stream(p, max_new_tokens=10, seed=i, stop=["e"]))
        if kind == 4:
            return model.complete(long_prompt, max_new_tokens=8, seed=i, context="truncate").text
        return model.score(p).logprobs

    expected = [job(i) for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(job, range(24)))
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if i % 6 == 5:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        else:
            assert a == b, i


def test_broken_pipe_is_a_quiet_exit(exported: Exported, tmp_path: Path):
    """`gptkit run ... | head -c 1`: the reader leaves; no traceback, exit 0."""
    proc = gptkit(
        *("run", "-m", str(exported.path), "-p", "ROMEO:", "--seed", "1"),
        *("-n", "100000", "--context", "truncate", "--threads", "1"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.read(proc.stdout.fileno(), 1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err


# ---- fuzzing: metadata strings --------------------------------------------------------------

_BYTES_TOKENIZER = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, name="bytes")
VALID_PROPS = ModelMetadata(
    config={"vocab_size": 257, "block_size": 16, "n_layer": 1, "n_head": 1, "n_embd": 8},
    tokenizer=_BYTES_TOKENIZER,
    export={"logits": "all"},
).to_props()
KEYS = [KEY_FORMAT, KEY_CONFIG, KEY_TOKENIZER, KEY_EXPORT]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _parse(props: dict[str, str]) -> None:
    try:
        meta = ModelMetadata.from_props(props, source="fuzz.onnx")
    except ModelFileError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.onnx")
        return
    # success: what the runtime reads next must be usable too
    assert meta.n_layer > 0 and meta.head_dim > 0 and meta.block_size > 0
    assert meta.tokenizer.n_vocab <= meta.vocab_size
    assert isinstance(meta.kv_cache, str)


@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), st.text(), max_size=6))
@example({**VALID_PROPS, KEY_CONFIG: "[" * 100_000})  # found a defect: RecursionError
@example({**VALID_PROPS, KEY_EXPORT: '{"a":' * 100_000})
@example({**VALID_PROPS, KEY_TOKENIZER: "[" * 100_000})
@example({**VALID_PROPS, KEY_TOKENIZER: '{"ranks": null}'})  # found a defect: AttributeError
def test_arbitrary_metadata_strings(props):
    _parse(props)


@given(
    key=st.sampled_from(KEYS),
    mutation=st.sampled_from(["truncate", "delete", "insert", "json", "tokenizer-field"]),
    data=st.data(),
)
def test_corrupted_valid_metadata(key, mutation, data):
    props = dict(VALID_PROPS)
    value = props[key]
    if mutation == "truncate":
        props[key] = value[: data.draw(st.integers(0, len(value)))]
    elif mutation == "delete":
        i = data.draw(st.integers(0, len(value)))
        props[key] = value[:i] + value[i + data.draw(st.integers(1, 50)) :]
    elif mutation == "insert":
        i = data.draw(st.integers(0, len(value)))
        props[key] = value[:i] + data.draw(st.text(min_size=1, max_size=8)) + value[i:]
    elif mutation == "json":
        props[key] = json.dumps(data.draw(json_values))
    else:  # one field of a JSON value replaced by an arbitrary JSON value
        doc = json.loads(VALID_PROPS[KEY_TOKENIZER if key == KEY_FORMAT else key])
        field = data.draw(st.sampled_from(sorted(doc) + ["extra"]))
        doc[field] = data.draw(json_values)
        props[KEY_TOKENIZER if key == KEY_FORMAT else key] = json.dumps(doc)
    _parse(props)


def test_valid_metadata_round_trips():
    """The fuzzers' starting point parses: a failing parse above is a finding, not a setup bug."""
    meta = ModelMetadata.from_props(VALID_PROPS)
    assert meta.tokenizer == _BYTES_TOKENIZER and meta.block_size == 16


# ---- fuzzing: sampling (what tests/test_sampling.py does not cover) ---------------------------

anything = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=4)
    | st.lists(st.integers(), max_size=2)
)


@given(
    field=st.sampled_from(
        ["max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"]
        + ["stop", "stop_at_eot"]
    ),
    value=anything,
)
@example(field="temperature", value=10**400)  # found a defect: OverflowError, not ConfigError
@example(field="top_p", value=-(10**400))
def test_sampling_config_accepts_or_raises_config_error(field, value):
    try:
        cfg = SamplingConfig(**{field: value})
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        assert math.isfinite(getattr(cfg, name))


@given(
    logits=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=16), min_size=1).map(
        lambda xs: np.array(xs, dtype=np.float16)
    ),  # fp16 exports return fp16-range values
    pad=st.integers(0, 4),
    context=st.lists(st.integers(-(2**31), 2**31), max_size=6),
    penalty=st.floats(0.1, 3.0),
    temperature=st.floats(0.0, 5.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_padded_vocab_and_any_context_ids_never_yield_a_padded_id(
    logits, pad, context, penalty, temperature, seed
):
    """Context ids may be anything (negative, past the vocabulary); padding ids never come out."""
    n_vocab = logits.size
    padded = np.concatenate([logits, np.full(pad, 1e4, dtype=np.float16)])
    cfg = SamplingConfig(temperature=temperature, repetition_penalty=penalty)
    token = choose_token(padded, cfg, np.random.default_rng(seed), n_vocab=n_vocab, context=context)
    assert 0 <= token < n_vocab
