"""`--kv-cache inplace --kv-cache-dtype int8`: the in-place cache stored as int8.

GroupQueryAttention quantizes each new key/value row with static per-channel scales (one per head
and head dimension, calibrated at export, stored as initializers ``kv_scale.{layer}.key|value``)
and dequantizes inside attention. The file must say so (graph types, node attributes, metadata),
pass parity on dequantized presents, give the fp32 cache's greedy tokens on the tiny model, run
in the runtime and the serving engine with int8 buffers, and be refused where it cannot run.

Figures measured on this tiny model (std-0.05 matrices; fp32 weights): parity worst ~0.03
(tolerance 0.5), argmax agreement 1.0, 16/16 greedy tokens; int8 weights ~0.05, int4 weights
~0.4 (their own tolerances 1.0 and 2.0 apply). Each variant is exported once per module.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from reliability_helpers import one_line_error

import export.inplace_cache
import runtime
import runtime.session
from export import ExportOptions, export_onnx
from export.inplace_cache import (
    KV_CALIBRATION_HEADROOM,
    KV_INT8_LEVELS,
    MAX_CALIBRATION_WINDOWS,
    calibration_ids,
    kv_cache_scales,
    kv_scale_names,
    read_calibration_text,
)
from export.parity import KV_INT8_TOLERANCE, TOLERANCES, verify_parity
from gpt_core.checkpoint import save_model
from gpt_core.config import GPTConfig
from gpt_core.model import GPT
from gptkit.cli import cli
from runtime.engine import Engine
from runtime.errors import ConfigError, ExportError, ParityError
from runtime.metadata import ModelMetadata, read_props
from runtime.model import Model
from runtime.sampling import SamplingConfig
from runtime.session import OnnxSession, ort_supports_kv_quant

SEED = 1234
GREEDY = 24
PROMPTS = ["ROMEO:", "To be, or not to be", "\n", "What light through yonder window breaks?"]
GQA = ("GroupQueryAttention", "com.microsoft")
K_SCALE, V_SCALE = 12, 13  # GroupQueryAttention's input slots of k_scale and v_scale
# weights -> (max worst |diff| allowed here, min argmax agreement, min greedy tokens identical)
WEIGHTS = {"fp32": (0.15, 1.0, 16), "int8": (0.25, 0.9, 4), "int4": (1.0, 0.5, 2)}


def make_model() -> GPT:
    """A tiny GPT with std-0.05 matrices (as test_inplace_cache's): greedy decoding walks through
    many ids, so token agreement means something."""
    torch.manual_seed(SEED)
    model = GPT(GPTConfig.preset("tiny")).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.05)
    return model


def int8_options(weights: str = "fp32") -> ExportOptions:
    quantize = None if weights == "fp32" else weights
    return ExportOptions(kv_cache="inplace", kv_cache_dtype="int8", quantize=quantize)


def gqa_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if (n.op_type, n.domain) == GQA]


def metadata(path: Path) -> ModelMetadata:
    props = read_props(path)
    assert props is not None
    return ModelMetadata.from_props(props)


def file_scales(path: Path) -> dict[str, np.ndarray]:
    return {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(path)).graph.initializer
        if t.name.startswith("kv_scale.")
    }


def rows_of(tokens, n_rows: int) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for token in tokens:
        rows[token.row].append(token.id)
    return rows


def runtime_greedy(path: Path, prompts, n: int, **session_options) -> list[list[int]]:
    model = Model(OnnxSession(path, threads=1, **session_options))
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eot=False)
    return rows_of(model.generate_tokens(prompts, cfg), len(prompts))


@pytest.fixture(scope="module", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Whatever gptkit caches (tokens, optimised graphs) lands in tmp, never in ~."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTKIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kv8")


@pytest.fixture(scope="module")
def int8_exports(model, bpe_tokenizer, export_dir):
    """weights -> ExportResult of the int8-cache export, each exported on first use only."""
    done = {}

    def get(weights: str):
        if weights not in done:
            path = export_dir / f"kv8-{weights}.onnx"
            done[weights] = export_onnx(model, bpe_tokenizer, path, options=int8_options(weights))
        return done[weights]

    return get


@pytest.fixture(scope="module")
def kv8_path(int8_exports) -> Path:
    return int8_exports("fp32").path


@pytest.fixture(scope="module")
def fp32_inplace_path(model, bpe_tokenizer, export_dir) -> Path:
    """The same model with the in-place cache in fp32 (parity is test_inplace_cache's business)."""
    options = ExportOptions(kv_cache="inplace")
    path = export_dir / "inplace-fp32.onnx"
    return export_onnx(model, bpe_tokenizer, path, options=options, verify=False).path


@pytest.fixture(scope="module")
def prompt_ids(bpe_tokenizer) -> list[list[int]]:
    rows = [bpe_tokenizer.encode(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) == len(rows)  # all different: the batch is left-padded
    return rows


# ---- the graph ---------------------------------------------------------------------------------


def test_cache_inputs_and_outputs_are_int8(model, kv8_path):
    proto = onnx.load(str(kv8_path))
    cache = [v for v in [*proto.graph.input, *proto.graph.output] if "." in v.name]
    names = {v.name for v in cache}
    assert len(cache) == 4 * model.config.n_layer  # past + present, key + value, per layer
    assert {n.split(".")[0] for n in names} == {"past_key_values", "present"}
    for value in cache:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT8, value.name
    others = [v for v in proto.graph.output if v.name not in names]
    assert [v.type.tensor_type.elem_type for v in others] == [onnx.TensorProto.FLOAT]  # logits
    session = OnnxSession(kv8_path, threads=1)
    types = {i.name: i.type for i in session.session.get_inputs()}
    assert {types[n] for n in session.past_names} == {"tensor(int8)"}


def test_group_query_attention_quantizes_with_per_channel_scale_initializers(model, kv8_path):
    cfg = model.config
    proto = onnx.load(str(kv8_path))
    nodes = gqa_nodes(proto)
    assert len(nodes) == cfg.n_layer
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    graph_inputs = {v.name for v in proto.graph.input}
    seen = set()
    for node in nodes:
        layer = int(re.fullmatch(r"past_key_values\.(\d+)\.key", node.input[3]).group(1))
        seen.add(layer)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["kv_cache_bit_width"] == 8
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL"
        scales = list(node.input)[K_SCALE : V_SCALE + 1]
        assert (
            scales
            == list(kv_scale_names(layer))
            == [
                f"kv_scale.{layer}.key",
                f"kv_scale.{layer}.value",
            ]
        )
        for name in scales:
            assert name in initializers and name not in graph_inputs
            scale = initializers[name]
            assert scale.dtype == np.float32
            assert scale.shape == (1, cfg.n_head, 1, cfg.head_dim)
            assert (scale > 0).all() and np.isfinite(scale).all()
    assert seen == set(range(cfg.n_layer))


def test_scales_are_the_calibrated_channel_maxima_with_headroom(model, kv8_path):
    """The stored scales are kv_cache_scales of calibration_ids: |max| x headroom / 127."""
    ids = calibration_ids(model)
    assert ids.shape == (2, model.config.block_size)
    expected = kv_cache_scales(model, ids)
    stored = file_scales(kv8_path)
    assert len(stored) == 2 * model.config.n_layer
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
    for layer, (pair, tensors) in enumerate(zip(expected, past, strict=True)):
        for name, scale, tensor in zip(kv_scale_names(layer), pair, tensors, strict=True):
            np.testing.assert_array_equal(stored[name], scale.numpy())
            channel_max = tensor.abs().amax(dim=(0, 2), keepdim=True).numpy()
            np.testing.assert_allclose(
                stored[name] * KV_INT8_LEVELS / KV_CALIBRATION_HEADROOM, channel_max, rtol=1e-5
            )


def test_metadata_names_the_int8_cache(kv8_path, fp32_inplace_path):
    meta = metadata(kv8_path)
    assert meta.kv_dtype == "int8" == meta.export["kv_dtype"]
    assert meta.kv_cache == "inplace" and meta.export["dtype"] == "fp32"
    assert meta.export["quantize"] is None
    assert metadata(fp32_inplace_path).kv_dtype == "fp32"


# ---- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_export_parity_report(int8_exports, weights):
    max_worst, min_argmax, min_greedy = WEIGHTS[weights]
    result = int8_exports(weights)
    report = result.parity
    assert report is not None and report.ok, report.failures
    assert report.variant == f"{weights}, int8 KV cache"
    assert report.tolerance == max(TOLERANCES[weights], KV_INT8_TOLERANCE)
    if weights == "fp32":
        assert report.tolerance == KV_INT8_TOLERANCE
    # int8 rounding shows in the presents (an fp32 cache gives ~1e-6), far below the tolerance
    assert 1e-3 < report.worst < max_worst <= report.tolerance
    names = list(report.max_diff)
    shared = [n for n in names if n.endswith(", shared buffer)")]
    assert len(shared) == len(names) // 2 == 2 * 5  # logits + presents, prompt + 4 steps
    assert "logits (prompt)" in names and "present.* (decode step 4)" in names
    assert "present.* (decode step 4, shared buffer)" in shared
    assert report.argmax_agreement >= min_argmax
    assert report.greedy_total == 16 and report.greedy_match >= min_greedy
    assert "int8 KV cache" in report.lines()[0]
    meta = metadata(result.path)
    assert meta.kv_dtype == "int8" and meta.export["quantize"] == (
        None if weights == "fp32" else weights
    )
    assert any(note.startswith("int8 KV cache: per-channel scales") for note in result.notes)


def tampered(path: Path, target: Path, name: str, factor: float) -> Path:
    proto = onnx.load(str(path))
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.name == name:
            array = numpy_helper.to_array(tensor) * np.float32(factor)
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            break
    else:
        raise AssertionError(f"no initializer {name}")
    onnx.save(proto, str(target))
    return target


@pytest.mark.parametrize("name", ["kv_scale.0.key", "kv_scale.1.value"])
def test_wrong_scales_fail_parity(model, kv8_path, tmp_path, name):
    """100x a layer's scales (saved in a copy): the graph quantizes with them, parity catches it."""
    bad = tampered(kv8_path, tmp_path / "bad.onnx", name, 100.0)
    report = verify_parity(model, bad, decode_steps=1, greedy_tokens=2, raise_on_failure=False)
    assert not report.ok and report.worst > KV_INT8_TOLERANCE
    assert any(f.startswith("present.* (prompt") for f in report.failures), report.failures
    with pytest.raises(ParityError, match=r"int8 KV cache.*present\.\*"):
        verify_parity(model, bad, decode_steps=1, greedy_tokens=2)


def test_the_graph_quantizes_with_the_stored_scales(kv8_path, tmp_path):
    """Raw int8 rows: 100x layer 0's key scale shrinks that buffer's codes ~100x; layer 0's
    values (computed before any attention) stay bit-identical."""
    bad = tampered(kv8_path, tmp_path / "bad.onnx", "kv_scale.0.key", 100.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, (1, 12))
    mask, positions = np.ones((1, 12), np.int64), np.arange(12)[None]
    buffers = []
    for path in (kv8_path, bad):
        session = OnnxSession(path, threads=1)
        _, cache = session.run(ids, mask, positions, session.empty_cache(1, 12))
        buffers.append([np.asarray(b).astype(np.int32) for b in cache.values])
    good, worse = buffers
    assert np.abs(good[0]).max() >= 30  # the calibrated range is used (headroom 2: up to ~63)
    assert np.abs(worse[0]).max() <= 2  # the same keys, coded with a 100x coarser step
    np.testing.assert_array_equal(worse[1], good[1])  # past_key_values.0.value


# ---- the runtime -------------------------------------------------------------------------------


def test_session_and_buffers_are_int8(model, kv8_path):
    cfg = model.config
    session = OnnxSession(kv8_path, threads=1)
    assert session.kv_dtype is np.int8 and session.inplace
    cache = session.empty_cache(2, 8)
    assert len(cache.values) == 2 * cfg.n_layer
    for buffer in cache.values:
        assert buffer.dtype == np.int8 and buffer.shape == (2, cfg.n_head, 8, cfg.head_dim)
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    _, cache = session.run(ids, np.ones((2, 3), np.int64), np.array([[0, 1, 2]] * 2), cache)
    for buffer in cache.values:
        assert buffer[:, :, :3].any(axis=(1, 3)).all() and not buffer[:, :, 3:].any()
    with pytest.raises(ValueError, match="the cache's dtype"):
        session.bind_buffers(tuple(np.zeros((1, cfg.n_head, 4, cfg.head_dim), np.float32)))
    unshared = OnnxSession(kv8_path, threads=1, io_binding=False)
    assert unshared.kv_dtype is np.int8 and not unshared.inplace
    assert all(v.dtype == np.int8 and v.shape[2] == 0 for v in unshared.empty_cache(2).values)


def test_batch_greedy_equals_the_fp32_cache(kv8_path, fp32_inplace_path, prompt_ids):
    """Left-padded batch of 4 prompts: on this model the int8 cache never flips a greedy token
    (measured: 24/24 on every row), whether shared in place or concatenated."""
    int8 = runtime_greedy(kv8_path, prompt_ids, GREEDY)
    fp32 = runtime_greedy(fp32_inplace_path, prompt_ids, GREEDY)
    assert int8 == fp32
    assert all(len(row) == GREEDY for row in int8)
    assert all(len(set(row)) >= 4 for row in int8)  # varied sequences, not one id repeated
    assert runtime_greedy(kv8_path, prompt_ids, GREEDY, io_binding=False) == int8


def test_runtime_load_generates_as_the_fp32_cache(kv8_path, fp32_inplace_path):
    cfg = SamplingConfig(max_new_tokens=16, temperature=0, stop_at_eot=False)
    int8, fp32 = (runtime.load(p, threads=1) for p in (kv8_path, fp32_inplace_path))
    assert int8.metadata.kv_dtype == "int8"
    text = int8.complete("ROMEO:", cfg).text
    assert text == fp32.complete("ROMEO:", cfg).text and text.strip()


def test_engine_matches_the_runtime_on_the_int8_file(kv8_path, prompt_ids):
    model = runtime.load(kv8_path, threads=1)
    engine = Engine.load(kv8_path, max_batch=3, threads=1)
    assert engine.shared_buffer
    assert {b.dtype for b in engine._cache.buffers} == {np.dtype(np.int8)}  # type: ignore[attr-defined]
    jobs = [(prompt_ids[0], 40), (prompt_ids[3], 30), (prompt_ids[1], 20)]
    late_job = (prompt_ids[2], 12)
    with engine:
        requests = [
            engine.submit(ids, SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eot=False))
            for ids, n in jobs
        ]
        next(iter(requests[0]))  # streams are running before the last request joins
        late_ids, late_n = late_job
        late_cfg = SamplingConfig(max_new_tokens=late_n, temperature=0, stop_at_eot=False)
        late = engine.submit(late_ids, late_cfg)
        outputs = [r.result(timeout=120).token_ids for r in [*requests, late]]
    for (ids, n), got in zip([*jobs, late_job], outputs, strict=True):
        cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eot=False)
        assert got == [t.id for t in model.generate_tokens(ids, cfg)]
        assert len(got) == n
    assert engine.stats().busy_slots == 0


# ---- calibrating on a text (`--kv-calibration`) -----------------------------------------------


CORPUS = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!\n" * 40


def test_calibration_windows_spread_over_the_text(model):
    block = model.config.block_size
    text = list(range(3, 3 + 10 * block))  # position i holds id i + 3: windows are recognisable
    ids = calibration_ids(model, text_ids=text)
    assert ids.shape == (1 + MAX_CALIBRATION_WINDOWS, block)
    np.testing.assert_array_equal(ids[0], calibration_ids(model)[0])  # the random row, as before
    starts = [int(row[0]) - 3 for row in ids[1:]]
    assert starts[0] == 0 and starts[-1] == len(text) - block  # first and last window
    for start, row in zip(starts, ids[1:], strict=True):
        np.testing.assert_array_equal(row, np.arange(start, start + block) + 3)
    # just enough text: one window; a token short: one line naming both numbers and the fix
    assert calibration_ids(model, text_ids=text[:block]).shape == (2, block)
    with pytest.raises(ExportError, match=rf"is {block - 1} tokens.*block_size \({block}\)"):
        calibration_ids(model, text_ids=text[: block - 1])


def test_scales_take_the_maximum_over_every_row(model):
    """Row by row (bounded memory) gives the scales of one batched pass."""
    ids = calibration_ids(model, text_ids=list(range(5 * model.config.block_size)))
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
    for pair, tensors in zip(kv_cache_scales(model, ids), past, strict=True):
        for scale, tensor in zip(pair, tensors, strict=True):
            peak = tensor.abs().amax(dim=(0, 2), keepdim=True)
            torch.testing.assert_close(scale, peak * KV_CALIBRATION_HEADROOM / KV_INT8_LEVELS)


def test_export_calibrated_on_a_text(model, bpe_tokenizer, tmp_path, kv8_path, monkeypatch):
    """No sampling, scales from the text's windows, parity as the self-sampled export's, and the
    metadata and notes say which text."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")

    greedy_only = GPT.generate  # parity's greedy check still runs

    def no_sampling(self, *args, temperature=1.0, **kwargs):
        assert temperature == 0, "a calibration text replaces sampling"
        return greedy_only(self, *args, temperature=temperature, **kwargs)

    monkeypatch.setattr(GPT, "generate", no_sampling)
    options = ExportOptions(kv_cache="inplace", kv_cache_dtype="int8", kv_calibration=str(corpus))
    result = export_onnx(model, bpe_tokenizer, tmp_path / "text.onnx", options=options)
    assert result.parity is not None and result.parity.ok
    rows = calibration_ids(model, text_ids=bpe_tokenizer.encode(CORPUS, allow_special=True))
    expected = kv_cache_scales(model, rows)
    stored = file_scales(result.path)
    for layer, pair in enumerate(expected):
        for name, scale in zip(kv_scale_names(layer), pair, strict=True):
            np.testing.assert_array_equal(stored[name], scale.numpy())
    assert any(
        not np.array_equal(scale, file_scales(kv8_path)[name]) for name, scale in stored.items()
    )
    assert metadata(result.path).export["kv_calibration"] == {
        "text": "corpus.txt",
        "rows": len(rows),
    }
    assert metadata(kv8_path).export["kv_calibration"]["text"] == "sampled by the model"
    assert any(f"{len(rows) - 1} window(s) of corpus.txt" in note for note in result.notes)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "not found"),
        (b"", "is empty"),
        ("dir", "is a directory"),
        (b"\xff\xfe\x00binary", "is not UTF-8 text (byte 0)"),
        (b"short text", "tokens; the KV cache needs at least block_size (64)"),
    ],
    ids=["missing", "empty", "directory", "binary", "short"],
)
def test_bad_calibration_text_is_refused(model, bpe_tokenizer, tmp_path, content, needle):
    path = tmp_path / "corpus.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    options = ExportOptions(kv_cache="inplace", kv_cache_dtype="int8", kv_calibration=str(path))
    out = tmp_path / "x.onnx"
    with pytest.raises(ExportError, match=re.escape(needle)) as info:
        export_onnx(model, bpe_tokenizer, out, options=options)
    assert "\n" not in str(info.value) and not out.exists()


def test_calibration_text_needs_the_int8_cache(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    with pytest.raises(ExportError, match=r"--kv-calibration .*add --kv-cache-dtype int8"):
        ExportOptions(kv_cache="inplace", kv_calibration=str(corpus)).validate()


def test_a_character_cut_by_the_read_limit_is_dropped(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ab\u00e9cd", encoding="utf-8")  # é is 2 bytes: b"ab\xc3\xa9cd"
    monkeypatch.setattr(export.inplace_cache, "MAX_CALIBRATION_BYTES", 3)
    assert read_calibration_text(corpus) == "ab"
    monkeypatch.setattr(export.inplace_cache, "MAX_CALIBRATION_BYTES", 4)
    assert read_calibration_text(corpus) == "ab\u00e9"


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (ExportOptions(kv_cache_dtype="int8"), "needs --kv-cache inplace"),
        (ExportOptions(kv_cache="inplace", kv_cache_dtype="int8", dtype="fp16"), "--dtype fp16"),
        (ExportOptions(kv_cache="inplace", kv_cache_dtype="int4"), "unknown KV-cache dtype 'int4'"),
    ],
    ids=["concat", "fp16", "int4"],
)
def test_options_refused(options, needle):
    with pytest.raises(ExportError, match=re.escape(needle)) as info:
        options.validate()
    assert "\n" not in str(info.value)


def test_old_onnxruntime_refused_at_export(model, bpe_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(onnxruntime, "__version__", "1.26.0")
    with pytest.raises(ExportError, match=r"needs onnxruntime >= 1\.27 \(this is 1\.26\.0\)"):
        int8_options().validate()
    with pytest.raises(ExportError, match=r">= 1\.27"):
        export_onnx(model, bpe_tokenizer, tmp_path / "x.onnx", options=int8_options())
    assert not (tmp_path / "x.onnx").exists()
    ExportOptions(kv_cache="inplace").validate()  # an fp32 cache needs no new onnxruntime


def test_old_onnxruntime_refused_at_load(kv8_path, fp32_inplace_path, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.session.ort, "__version__", "1.26.0")
    with pytest.raises(ConfigError, match=r"int8 KV cache, which needs onnxruntime >= 1\.27"):
        OnnxSession(kv8_path, threads=1)
    with pytest.raises(ConfigError, match=r"onnxruntime >= 1\.27 \(this is 1\.26\.0\)"):
        runtime.load(kv8_path, threads=1)
    OnnxSession(fp32_inplace_path, threads=1)  # an fp32 cache loads as before
    # A file without the kv_dtype metadata key is caught by its graph's int8 inputs.
    proto = onnx.load(str(kv8_path))
    for prop in proto.metadata_props:
        if prop.key == "gptkit.export":
            prop.value = prop.value.replace('"kv_dtype": "int8", ', "")
            assert '"kv_dtype"' not in prop.value
    bare = tmp_path / "no-kv-dtype.onnx"
    onnx.save(proto, str(bare))
    assert metadata(bare).kv_dtype == "fp32"
    with pytest.raises(ConfigError, match=r"onnxruntime >= 1\.27"):
        OnnxSession(bare, threads=1)


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("1.27.0", True),
        ("1.26.2", False),
        ("1.32.0.dev20260101", True),
        ("1.27.0rc1", True),
        ("1.17.3", False),
        ("2.0.0", True),
    ],
)
def test_ort_supports_kv_quant(version, supported):
    assert ort_supports_kv_quant(version) is supported


# ---- the CLI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, bpe_tokenizer) -> Path:
    return save_model(tmp_path_factory.mktemp("ckpt") / "step-000010", model, bpe_tokenizer)


def test_cli_export_int8_cache(runner, checkpoint, tmp_path, kv8_path):
    out = tmp_path / "kv8.onnx"
    args = ["export", str(out), "--checkpoint", str(checkpoint), "--kv-cache", "inplace"]
    result = runner.invoke(cli, [*args, "--kv-cache-dtype", "int8"])
    assert result.exit_code == 0, result.output
    stdout = result.stdout
    assert "Parity with PyTorch (fp32, int8 KV cache, tolerance 0.5):" in stdout
    assert re.search(r"present\.\* \(decode step 4, shared buffer\) +max \|diff\| \S+ +ok", stdout)
    assert "OVER" not in stdout and "greedy 16/16 tokens identical" in stdout
    assert "in-place KV cache (int8)" in stdout
    assert "int8 [batch_size, 2, past_sequence_length, 32]" in stdout
    assert "int8 KV cache: per-channel scales from 2 x 64 calibration tokens" in stdout
    assert metadata(out).kv_dtype == "int8"
    # the same weights give the same calibration, through a checkpoint as through the API
    ours, theirs = file_scales(out), file_scales(kv8_path)
    assert ours.keys() == theirs.keys()
    for name, scale in ours.items():
        np.testing.assert_array_equal(scale, theirs[name])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [([], "--kv-cache inplace"), (["--kv-cache", "inplace", "--dtype", "fp16"], "--dtype fp16")],
    ids=["concat", "fp16"],
)
def test_cli_refuses_int8_cache_without_inplace(runner, checkpoint, tmp_path, extra, needle):
    out = tmp_path / "x.onnx"
    args = ["export", str(out), "--checkpoint", str(checkpoint), "--kv-cache-dtype", "int8"]
    result = runner.invoke(cli, [*args, *extra])
    one_line_error(result, "--kv-cache-dtype int8", needle, code=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_hf_format_refuses_the_option(runner, checkpoint, tmp_path):
    out = tmp_path / "hf-dir"
    args = ["export", str(out), "--format", "hf", "--checkpoint", str(checkpoint)]
    result = runner.invoke(cli, [*args, "--kv-cache-dtype", "int8"])
    one_line_error(result, "--kv-cache-dtype does not apply to --format hf", code=2)
    assert not out.exists()


def test_cli_unknown_kv_cache_dtype_is_a_usage_error(runner, checkpoint, tmp_path):
    args = ["export", str(tmp_path / "x.onnx"), "--checkpoint", str(checkpoint)]
    result = runner.invoke(cli, [*args, "--kv-cache", "inplace", "--kv-cache-dtype", "int4"])
    assert result.exit_code == 2
    assert "Invalid value for '--kv-cache-dtype'" in result.output and "'int4'" in result.output


def test_cli_export_calibrated_on_a_text(runner, checkpoint, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "kv8.onnx"
    args = ["export", str(out), "--checkpoint", str(checkpoint), "--kv-cache", "inplace"]
    result = runner.invoke(
        cli, [*args, "--kv-cache-dtype", "int8", "--kv-calibration", str(corpus)]
    )
    assert result.exit_code == 0, result.output
    assert "window(s) of corpus.txt" in result.stdout
    assert metadata(out).export["kv_calibration"]["text"] == "corpus.txt"


def test_cli_calibration_text_without_the_int8_cache(runner, checkpoint, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "x.onnx"
    args = ["export", str(out), "--checkpoint", str(checkpoint), "--kv-cache", "inplace"]
    result = runner.invoke(cli, [*args, "--kv-calibration", str(corpus)])
    one_line_error(result, "--kv-calibration", "--kv-cache-dtype int8", code=1)
    assert not out.exists()


def test_cli_help_lists_the_option(runner):
    result = runner.invoke(cli, ["export", "--help"])
    assert result.exit_code == 0, result.output
    assert "--kv-cache-dtype [int8]" in result.stdout
    assert "ONNX Runtime >= 1.27" in " ".join(result.stdout.split())
