"""`--kv-cache inplace`: attention as ORT's GroupQueryAttention, the KV cache written in place.

The graph keeps the default export's inputs and outputs. Used like the default (present = past +
new, here "concat mode") it must match PyTorch as the default does; with ``past_key_values.*`` and
``present.*`` bound to one buffer per layer (``OnnxSession.empty_cache(batch, capacity)``, the
"shared mode") it must write the new rows into that buffer and still match PyTorch. The runtime
must then give the same tokens as the default export and as PyTorch, however the generation goes
(left padding, rows stopping early, re-prefills when truncating).
"""

from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from runtime_helpers import (
    empty_past,
    left_padded_mask,
    ort_session,
    ort_step,
    positions_for,
)

import runtime.generation
from export import ExportOptions, export_onnx
from export.parity import TOLERANCES, verify_parity
from gpt_core.checkpoint import save_model
from gpt_core.config import GPTConfig
from gpt_core.model import GPT
from gptkit.cli import cli
from runtime.errors import ExportError, ModelFileError, ParityError
from runtime.generation import GenerationLoop
from runtime.metadata import ModelMetadata
from runtime.model import Model
from runtime.onnx_contract import KV_CONCAT, KV_INPLACE
from runtime.sampling import SamplingConfig
from runtime.session import OnnxSession

SEED = 1234
ATOL = 1e-4
GREEDY = 24
PROMPTS = ["ROMEO:", "To be, or not to be", "\n", "What light through yonder window breaks?"]
ORT_INVALID = ort.capi.onnxruntime_pybind11_state.InvalidArgument
GQA = ("GroupQueryAttention", "com.microsoft")
# GroupQueryAttention's 11 input slots; the export uses these six and leaves the rest "".
SLOTS = ("query", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length")
SLOTS += ("", "", "", "attention_bias")
# ORT's CPU GroupQueryAttention refuses a multi-token step on a non-empty past at batch > 1.
GQA_BATCHED_CHUNK = (
    "ORT's GroupQueryAttention: 'batch_size must be 1 when sequence_length > 1 and past context "
    "is given' (the runtime itself never runs this shape)"
)


def make_model(seed: int = SEED, **overrides) -> GPT:
    """A tiny GPT with std-0.05 matrices: greedy decoding then walks through many different ids."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.05)
    return model


def metadata(path: Path) -> ModelMetadata:
    return ModelMetadata.from_props(ort_session(path).get_modelmeta().custom_metadata_map)


def gqa_nodes(proto) -> list:
    return [n for n in proto.graph.node if (n.op_type, n.domain) == GQA]


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
    return tmp_path_factory.mktemp("inplace")


@pytest.fixture(scope="module")
def inplace_export(model, bpe_tokenizer, export_dir):
    options = ExportOptions(kv_cache="inplace")
    return export_onnx(model, bpe_tokenizer, export_dir / "inplace.onnx", options=options)


@pytest.fixture(scope="module")
def concat_export(model, bpe_tokenizer, export_dir):
    return export_onnx(model, bpe_tokenizer, export_dir / "concat.onnx")


@pytest.fixture(scope="module")
def inplace_path(inplace_export) -> Path:
    return inplace_export.path


@pytest.fixture(scope="module")
def plain_session(inplace_path):
    """A bare InferenceSession: the graph used like the default one (no shared buffers)."""
    return ort_session(inplace_path)


@pytest.fixture(scope="module")
def shared_session(inplace_path) -> OnnxSession:
    return OnnxSession(inplace_path, threads=1)


@pytest.fixture(scope="module")
def prompt_ids(bpe_tokenizer) -> list[list[int]]:
    rows = [bpe_tokenizer.encode(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) == len(rows)  # all different: the batch is left-padded
    return rows


# ---- the graph ---------------------------------------------------------------------------------


def test_one_group_query_attention_per_layer_with_inputs_in_their_slots(model, inplace_path):
    cfg = model.config
    proto = onnx.load(inplace_path)
    nodes = gqa_nodes(proto)
    assert len(nodes) == cfg.n_layer
    assert not any(n.op_type == "Softmax" for n in proto.graph.node)
    assert "com.microsoft" in {o.domain for o in proto.opset_import}
    produced = {out for n in proto.graph.node for out in n.output}
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    shared = {}
    by_layer = sorted(nodes, key=lambda n: n.input[3])
    for i, node in enumerate(by_layer):
        inputs = list(node.input)
        assert len(inputs) == len(SLOTS)
        for slot, name in zip(SLOTS, inputs, strict=True):
            assert bool(name) == bool(slot), (i, slot, inputs)
        assert inputs[3:5] == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert list(node.output)[1:] == [f"present.{i}.key", f"present.{i}.value"]
        assert inputs[0] in produced  # the packed c_attn output, computed in the graph
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == attrs["kv_num_heads"] == cfg.n_head
        for slot in (5, 6, 10):  # one seqlens_k, total length and mask for every layer
            shared.setdefault(slot, inputs[slot])
            assert inputs[slot] == shared[slot]
    assert types[shared[5]] == types[shared[6]] == onnx.TensorProto.INT32


def test_metadata_names_the_kv_cache(inplace_path, concat_export):
    assert metadata(inplace_path).kv_cache == KV_INPLACE == "inplace"
    assert metadata(inplace_path).export["kv_cache"] == "inplace"
    assert metadata(concat_export.path).kv_cache == KV_CONCAT == "concat"
    # A file from before the option (no kv_cache key) reads as concat.
    bare = ModelMetadata(config={}, tokenizer=metadata(inplace_path).tokenizer, export={})
    assert bare.kv_cache == KV_CONCAT


def test_same_inputs_outputs_and_signature_as_the_default_export(inplace_export, concat_export):
    assert inplace_export.inputs == concat_export.inputs
    assert inplace_export.outputs == concat_export.outputs
    assert inplace_export.signature == concat_export.signature
    a, b = ort_session(inplace_export.path), ort_session(concat_export.path)
    for got, expected in ((a.get_inputs(), b.get_inputs()), (a.get_outputs(), b.get_outputs())):
        assert [(v.name, v.type, v.shape) for v in got] == [
            (v.name, v.type, v.shape) for v in expected
        ]


def test_unknown_kv_cache_is_refused(model, bpe_tokenizer, tmp_path):
    with pytest.raises(ExportError, match="unknown KV cache 'bogus'; choose concat or inplace"):
        ExportOptions(kv_cache="bogus").validate()
    with pytest.raises(ExportError, match="unknown KV cache"):
        export_onnx(model, bpe_tokenizer, tmp_path / "x.onnx", options=ExportOptions(kv_cache=""))
    assert not (tmp_path / "x.onnx").exists()


# ---- parity matrix: batch {1, 3} x past {0, 1, 7} x seq {1, 5} x left padding -------------------


def torch_forward(model, ids, mask, seq, past=None):
    with torch.no_grad():
        return model(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions_for(mask, seq)),
            past_key_values=past,
            use_cache=True,
        )


def matrix_case(batch: int, past: int, seq: int, padded: bool):
    rng = np.random.default_rng(batch * 100 + past * 10 + seq + padded)
    ids = rng.integers(0, 512, (batch, past + seq), dtype=np.int64)
    return ids, left_padded_mask(batch, past + seq, padded)


def matrix_params(raises):
    for batch, past, seq, padded in itertools.product([1, 3], [0, 1, 7], [1, 5], [False, True]):
        marks = []
        if batch > 1 and past and seq > 1:
            marks = [pytest.mark.xfail(strict=True, raises=raises, reason=GQA_BATCHED_CHUNK)]
        name = f"b{batch}-p{past}-s{seq}{'-pad' if padded else ''}"
        yield pytest.param(batch, past, seq, padded, marks=marks, id=name)


def assert_matches_pytorch(model, expected, logits, presents, mask, length):
    cfg = model.config
    batch, seq = logits.shape[:2]
    ref_logits = expected.logits.numpy()
    assert logits.shape == (batch, seq, cfg.vocab_size)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=ATOL)
    ref_presents = [t.numpy() for pair in expected.past_key_values for t in pair]
    assert len(presents) == 2 * cfg.n_layer
    for got, ref in zip(presents, ref_presents, strict=True):
        assert got.shape == (batch, cfg.n_head, length, cfg.head_dim)
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    real = mask[:, -seq:].astype(bool)
    np.testing.assert_array_equal(logits.argmax(-1)[real], ref_logits.argmax(-1)[real])


@pytest.mark.parametrize(("batch", "past", "seq", "padded"), list(matrix_params(ORT_INVALID)))
def test_matrix_concat_mode(model, plain_session, batch, past, seq, padded):
    """The graph in a plain session: present = past + new, exactly like the default export."""
    ids, mask = matrix_case(batch, past, seq, padded)
    torch_past, onnx_past = None, empty_past(plain_session, batch)
    if past:
        torch_past = torch_forward(model, ids[:, :past], mask[:, :past], past).past_key_values
        onnx_past = {
            f"past_key_values.{i}.{kind}": tensor.numpy()
            for i, pair in enumerate(torch_past)
            for kind, tensor in zip(("key", "value"), pair, strict=True)
        }
    expected = torch_forward(model, ids[:, past:], mask, seq, torch_past)
    logits, presents, _ = ort_step(
        plain_session, ids[:, past:], mask, positions_for(mask, seq), onnx_past
    )
    assert_matches_pytorch(model, expected, logits, presents, mask, past + seq)


# ORT's refusal comes out of run_with_iobinding as a bare RuntimeError (see
# test_a_failing_inplace_run_is_a_model_file_error); ModelFileError once that is fixed.
@pytest.mark.parametrize(
    ("batch", "past", "seq", "padded"), list(matrix_params((RuntimeError, ModelFileError)))
)
def test_matrix_shared_mode(model, shared_session, batch, past, seq, padded):
    """Through the runtime's shared buffers: a prefill of ``past`` tokens, then the step."""
    ids, mask = matrix_case(batch, past, seq, padded)
    capacity = past + seq + 3  # spare rows, which must stay untouched
    cache = shared_session.empty_cache(batch, capacity)
    assert cache.capacity == capacity and cache.length == 0
    torch_past = None
    if past:
        torch_past = torch_forward(model, ids[:, :past], mask[:, :past], past).past_key_values
        _, cache = shared_session.run(
            ids[:, :past], mask[:, :past], positions_for(mask[:, :past], past), cache
        )
    expected = torch_forward(model, ids[:, past:], mask, seq, torch_past)
    logits, cache = shared_session.run(ids[:, past:], mask, positions_for(mask, seq), cache)
    assert cache.length == past + seq
    presents = [buffer[:, :, : cache.length] for buffer in cache.values]
    assert_matches_pytorch(model, expected, logits, presents, mask, past + seq)
    for buffer in cache.values:
        assert buffer.shape[2] == capacity
        assert not buffer[:, :, cache.length :].any()


# ---- the buffers are written in place ----------------------------------------------------------


def test_steps_write_into_the_same_buffers(model, shared_session):
    cfg = model.config
    batch, capacity = 2, 12
    cache = shared_session.empty_cache(batch, capacity)
    buffers, ort_values, binding = cache.values, cache.ort_values, cache.binding
    assert len(buffers) == len(ort_values) == 2 * cfg.n_layer
    for buffer, value in zip(buffers, ort_values, strict=True):
        assert isinstance(buffer, np.ndarray)
        assert buffer.shape == (batch, cfg.n_head, capacity, cfg.head_dim)
        assert buffer.dtype == np.float32 and not buffer.any()
        assert value.data_ptr() == buffer.ctypes.data  # the OrtValue wraps the numpy memory
    addresses = [b.ctypes.data for b in buffers]

    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (batch, 4))
    mask = np.ones((batch, 4), dtype=np.int64)
    mask[1, 0] = 0
    _, cache = shared_session.run(ids, mask, positions_for(mask, 4), cache)
    assert cache.length == 4
    for buffer in buffers:
        assert buffer[:, :, :4].any(axis=(1, 3)).all()  # every row written, padding included
        assert not buffer[:, :, 4:].any()
    before = [b[:, :, :4].copy() for b in buffers]

    for step in range(1, capacity - 4 + 1):
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        new = rng.integers(0, cfg.vocab_size, (batch, 1))
        _, cache = shared_session.run(new, mask, positions_for(mask, 1), cache)
        assert cache.length == 4 + step
        # No new tensors: the same buffers, OrtValues and binding, at the same addresses.
        assert cache.values is buffers and cache.ort_values is ort_values
        assert cache.binding is binding and cache.capacity == capacity
        assert [b.ctypes.data for b in cache.values] == addresses
        assert [v.data_ptr() for v in cache.ort_values] == addresses
        for buffer, old in zip(buffers, before, strict=True):
            assert buffer[:, :, 4 + step - 1].any(axis=-1).all()  # the new row landed
            assert not buffer[:, :, 4 + step :].any()
            np.testing.assert_array_equal(buffer[:, :, :4], old)  # the past stays as it was
    assert cache.length == capacity


def test_shared_buffers_hold_what_the_concat_mode_returns(model, shared_session, plain_session):
    """Step by step, the buffer rows [:length] equal the presents of the graph run unshared."""
    cfg = model.config
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (3, 6))
    mask = left_padded_mask(3, 6, padded=True)
    cache = shared_session.empty_cache(3, 10)
    past = empty_past(plain_session, 3)
    new = ids
    for _ in range(4):
        positions = positions_for(mask, new.shape[1])
        shared_logits, cache = shared_session.run(new, mask, positions, cache)
        logits, presents, past = ort_step(plain_session, new, mask, positions, past)
        np.testing.assert_allclose(shared_logits, logits, rtol=0, atol=1e-5)
        for buffer, present in zip(cache.values, presents, strict=True):
            np.testing.assert_allclose(buffer[:, :, : cache.length], present, rtol=0, atol=1e-5)
        new = logits[:, -1:].argmax(-1)
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)


def test_empty_cache_capacity_defaults_to_and_stops_at_the_context(model, shared_session):
    block = model.config.block_size
    assert shared_session.inplace
    assert shared_session.empty_cache(2).capacity == block
    assert shared_session.empty_cache(2, 10 * block).capacity == block
    cache = shared_session.empty_cache(2, 5)
    assert cache.capacity == 5 and all(b.shape[2] == 5 for b in cache.values)
    assert cache.binding is not None
    assert shared_session.empty_cache(2, 5).binding is not cache.binding  # one per generation


def test_capacity_overflow_is_a_value_error_and_leaves_the_cache_alone(model, shared_session):
    cfg = model.config
    ids = np.arange(1, 6)[None]
    with pytest.raises(ValueError, match="5 positions do not fit the cache's capacity of 4"):
        shared_session.run(
            ids, np.ones((1, 5)), np.arange(5)[None], shared_session.empty_cache(1, 4)
        )
    cache = shared_session.empty_cache(1, 4)
    _, cache = shared_session.run(ids[:, :3], np.ones((1, 3)), np.arange(3)[None], cache)
    snapshot = [b.copy() for b in cache.values]
    with pytest.raises(ValueError, match="capacity of 4"):
        shared_session.run(ids[:, 3:], np.ones((1, 5)), np.arange(3, 5)[None], cache)
    for buffer, old in zip(cache.values, snapshot, strict=True):
        np.testing.assert_array_equal(buffer, old)
    logits, cache = shared_session.run(ids[:, 3:4], np.ones((1, 4)), np.array([[3]]), cache)
    assert cache.length == cache.capacity == 4 and logits.shape == (1, 1, cfg.vocab_size)


def test_a_failing_inplace_run_is_a_model_file_error(inplace_path, shared_session):
    """An ONNX Runtime failure (here wpe's Gather out of range) is reported alike on both paths."""
    args = (np.array([[1, 2]]), np.ones((1, 2)), np.array([[0, 999]]))
    plain = OnnxSession(inplace_path, threads=1, io_binding=False)
    with pytest.raises(ModelFileError, match="onnxruntime failed running"):
        plain.run(*args, plain.empty_cache(1))
    with pytest.raises(ModelFileError, match="onnxruntime failed running"):
        shared_session.run(*args, shared_session.empty_cache(1, 4))


def test_io_binding_false_runs_the_same_file_unshared(inplace_path, model):
    session = OnnxSession(inplace_path, threads=1, io_binding=False)
    assert session.metadata.kv_cache == KV_INPLACE and not session.inplace
    cache = session.empty_cache(2, 8)
    assert cache.binding is None and cache.length == 0
    assert all(v.shape == (2, model.config.n_head, 0, model.config.head_dim) for v in cache.values)
    assert OnnxSession(inplace_path, threads=1, io_binding=True).inplace


# ---- the runtime: tokens -----------------------------------------------------------------------


def rows_of(tokens, n_rows: int) -> list[list[int]]:
    rows = [[] for _ in range(n_rows)]
    for token in tokens:
        rows[token.row].append(token.id)
    return rows


def runtime_greedy(path: Path, prompts, n: int, **session_options) -> list[list[int]]:
    model = Model(OnnxSession(path, threads=1, **session_options))
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eot=False)
    return rows_of(model.generate_tokens(prompts, cfg), len(prompts))


def test_batch_greedy_equals_default_export_and_pytorch(
    model, inplace_path, concat_export, prompt_ids
):
    expected = []
    for ids in prompt_ids:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), GREEDY, temperature=0)
        expected.append(out[0, len(ids) :].tolist())
    inplace = runtime_greedy(inplace_path, prompt_ids, GREEDY)
    assert inplace == runtime_greedy(concat_export.path, prompt_ids, GREEDY)
    assert inplace == expected
    assert all(len(set(row)) >= 6 for row in inplace)  # varied sequences, not one id repeated


def test_io_binding_false_on_an_inplace_file_gives_the_same_tokens(inplace_path, prompt_ids):
    assert runtime_greedy(inplace_path, prompt_ids, GREEDY, io_binding=False) == runtime_greedy(
        inplace_path, prompt_ids, GREEDY
    )


def test_capacity_is_the_window_plus_the_new_tokens(inplace_path, prompt_ids, monkeypatch):
    session = OnnxSession(inplace_path, threads=1)
    requested, real = [], session.empty_cache

    def spy(batch, capacity=None):
        cache = real(batch, capacity)
        requested.append((batch, capacity, cache.capacity))
        return cache

    monkeypatch.setattr(session, "empty_cache", spy)
    cfg = SamplingConfig(max_new_tokens=7, temperature=0, stop_at_eot=False)
    list(Model(session).generate_tokens(prompt_ids, cfg))
    width = max(len(p) for p in prompt_ids)
    assert requested == [(len(prompt_ids), width + 7, width + 7)]


def test_rows_stopping_at_eot_match_the_default_export(
    inplace_path, concat_export, prompt_ids, bpe_tokenizer, monkeypatch
):
    """Row 0 ends at <|endoftext|> on its second token; finished rows get masked dummies."""
    eot = bpe_tokenizer.eot_token
    real = runtime.generation.choose_token
    results = {}
    for name, path in (("inplace", inplace_path), ("concat", concat_export.path)):
        calls = []

        def eot_on_fifth_call(logits, config, rng, calls=calls, **kwargs):
            calls.append(1)
            return eot if len(calls) == 5 else real(logits, config, rng, **kwargs)

        monkeypatch.setattr(runtime.generation, "choose_token", eot_on_fifth_call)
        model = Model(OnnxSession(path, threads=1))
        cfg = SamplingConfig(max_new_tokens=GREEDY, temperature=0)
        results[name] = rows_of(model.generate_tokens(prompt_ids, cfg), len(prompt_ids))
    assert results["inplace"] == results["concat"]
    assert results["inplace"][0] == [*results["inplace"][0][:1], eot]
    assert all(len(row) == GREEDY for row in results["inplace"][1:])


def test_score_matches_the_default_export(inplace_path, concat_export, bpe_tokenizer):
    text = "ROMEO: But soft, what light through yonder window breaks?"
    a = Model(OnnxSession(inplace_path, threads=1)).score(text)
    b = Model(OnnxSession(concat_export.path, threads=1)).score(text)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


def test_threads_share_one_inplace_session(inplace_path, prompt_ids):
    model = Model(OnnxSession(inplace_path, threads=1))

    def job(i: int) -> list[int]:
        cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=i, stop_at_eot=False)
        return [t.id for t in model.generate_tokens(prompt_ids[i % len(prompt_ids)], cfg)]

    expected = [job(i) for i in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(job, range(8))) == expected


# ---- the runtime: context="truncate" with a 16-position model ----------------------------------

SMALL_BLOCK = 16


@pytest.fixture(scope="module")
def small_block_pair(bpe_tokenizer, export_dir) -> dict[str, Path]:
    small = make_model(block_size=SMALL_BLOCK)
    return {
        kv: export_onnx(
            small,
            bpe_tokenizer,
            export_dir / f"block16-{kv}.onnx",
            options=ExportOptions(kv_cache=kv),
        ).path
        for kv in ("inplace", "concat")
    }


def truncated_run(path: Path, prompts, n: int, eot: int = -1):
    session = OnnxSession(path, threads=1)
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_at_eot=eot >= 0)
    tokenizer = session.metadata.tokenizer
    decoder = GenerationLoop(
        session, prompts, cfg, n_vocab=tokenizer.n_vocab, eot_token=eot, context="truncate"
    )
    return rows_of(decoder, len(prompts)), decoder.prefills


def test_truncate_re_prefills_alike(small_block_pair, prompt_ids):
    long_prompt = (prompt_ids[3] * 3)[: SMALL_BLOCK + 4]  # over the context from the start
    prompts = [long_prompt, prompt_ids[1]]
    n = 3 * SMALL_BLOCK
    inplace = truncated_run(small_block_pair["inplace"], prompts, n)
    concat = truncated_run(small_block_pair["concat"], prompts, n)
    assert inplace == concat
    rows, prefills = inplace
    assert all(len(row) == n for row in rows) and prefills >= 4


def test_truncate_when_the_longest_row_stops_first(small_block_pair, bpe_tokenizer, monkeypatch):
    eot = bpe_tokenizer.eot_token
    real = runtime.generation.choose_token
    prompts = [list(range(1, 11)), [5, 6, 7, 8]]  # 10 and 4 tokens; row 0 stops at once
    results = {}
    for kv in ("concat", "inplace"):
        calls = []

        def eot_first(logits, config, rng, calls=calls, **kwargs):
            calls.append(1)
            return eot if len(calls) == 1 else real(logits, config, rng, **kwargs)

        monkeypatch.setattr(runtime.generation, "choose_token", eot_first)
        results[kv] = truncated_run(small_block_pair[kv], prompts, 30, eot=eot)
    assert results["concat"][0][0] == [eot] and len(results["concat"][0][1]) == 30
    # the in-place run may re-prefill once more (to drop finished rows' columns); same tokens
    assert results["inplace"][0] == results["concat"][0]


# ---- export variants ---------------------------------------------------------------------------

VARIANTS = {
    "int8": ExportOptions(kv_cache="inplace", quantize="int8"),
    "fp16": ExportOptions(kv_cache="inplace", dtype="fp16"),
    "optimize": ExportOptions(kv_cache="inplace", optimize=True),
    "opset20": ExportOptions(kv_cache="inplace", opset=20),
}


@pytest.fixture(scope="module")
def variant_paths(model, bpe_tokenizer, export_dir) -> dict[str, Path]:
    return {
        name: export_onnx(model, bpe_tokenizer, export_dir / f"{name}.onnx", options=options).path
        for name, options in VARIANTS.items()
    }


def shared_buffer_names(report) -> list[str]:
    return [name for name in report.max_diff if name.endswith(", shared buffer)")]


def test_verify_parity_checks_the_shared_buffer_too(model, inplace_path):
    report = verify_parity(model, inplace_path, decode_steps=4, greedy_tokens=GREEDY)
    assert report.ok and 0 < report.worst < 1e-5
    shared = shared_buffer_names(report)
    assert len(shared) == len(report.max_diff) // 2 == 2 * 5  # logits + presents, prompt + 4 steps
    assert "present.* (decode step 4, shared buffer)" in shared
    assert report.argmax_agreement == 1.0 and report.greedy_match == GREEDY
    assert "shared buffer" in "\n".join(report.lines())


def test_verify_parity_fails_a_foreign_model_on_the_shared_path(inplace_path):
    other = make_model(seed=SEED + 1)
    with pytest.raises(ParityError, match=re.escape("logits (prompt, shared buffer)")):
        verify_parity(other, inplace_path, decode_steps=1, greedy_tokens=2)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_exports_and_passes_parity(model, variant_paths, name):
    options, path = VARIANTS[name], variant_paths[name]
    proto = onnx.load(path)
    assert len(gqa_nodes(proto)) == model.config.n_layer
    assert not any(n.op_type == "Softmax" for n in proto.graph.node)
    meta = metadata(path)
    assert meta.kv_cache == KV_INPLACE and meta.export["opset"] == options.opset
    report = verify_parity(model, path, variant=options.variant, greedy_tokens=GREEDY)
    assert report.ok, report.failures
    assert report.tolerance == TOLERANCES[options.variant]
    assert report.worst <= report.tolerance and report.argmax_agreement >= 0.9
    assert len(shared_buffer_names(report)) == len(report.max_diff) // 2 > 0


def test_fp16_variant_keeps_an_fp16_shared_cache(model, variant_paths, prompt_ids):
    session = OnnxSession(variant_paths["fp16"], threads=1)
    assert session.inplace and session.kv_dtype == np.float16
    cache = session.empty_cache(2, 8)
    assert all(b.dtype == np.float16 for b in cache.values)
    tokens = runtime_greedy(variant_paths["fp16"], prompt_ids, 8)
    assert all(len(row) == 8 for row in tokens)


# ---- the CLI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, bpe_tokenizer) -> Path:
    return save_model(tmp_path_factory.mktemp("ckpt") / "step-000010", model, bpe_tokenizer)


@pytest.fixture(scope="module")
def cli_export(runner, tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("cli") / "inplace.onnx"
    result = runner.invoke(
        cli, ["export", str(out), "--checkpoint", str(checkpoint), "--kv-cache", "inplace"]
    )
    return result, out


def test_cli_export_inplace(cli_export):
    result, out = cli_export
    assert result.exit_code == 0, result.output
    stdout = result.stdout
    assert "Parity with PyTorch (fp32, tolerance 0.0001)" in stdout
    assert re.search(r"logits \(prompt, shared buffer\) +max \|diff\| \S+ +ok", stdout)
    assert "present.* (decode step 4, shared buffer)" in stdout
    assert "OVER" not in stdout and "greedy 16/16 tokens identical" in stdout
    assert "in-place KV cache" in stdout
    assert metadata(out).kv_cache == KV_INPLACE
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging file


def test_cli_rejects_an_unknown_kv_cache(runner, checkpoint, tmp_path):
    out = tmp_path / "bogus.onnx"
    result = runner.invoke(
        cli, ["export", str(out), "--checkpoint", str(checkpoint), "--kv-cache", "bogus"]
    )
    assert result.exit_code == 2
    assert "Usage:" in result.output
    assert "Invalid value for '--kv-cache'" in result.output and "'bogus'" in result.output
    assert not out.exists()


def test_cli_inspect_shows_the_kv_cache(runner, cli_export):
    _, out = cli_export
    result = runner.invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert re.search(r"^\s+kv_cache\s+inplace$", result.stdout, re.MULTILINE)
    assert "past_key_values.1.value" in result.stdout and "present.0.key" in result.stdout
    as_json = runner.invoke(cli, ["inspect", "--json", str(out)])
    assert as_json.exit_code == 0, as_json.output
    assert '"kv_cache": "inplace"' in as_json.stdout


def test_cli_run_gives_the_default_exports_text(runner, cli_export, model, bpe_tokenizer, tmp_path):
    _, inplace = cli_export
    concat = export_onnx(model, bpe_tokenizer, tmp_path / "concat.onnx").path
    outputs = []
    for path in (inplace, concat):
        args = ["run", "--model", str(path), "--prompt", "ROMEO:", "-n", "20", "-t", "0"]
        result = runner.invoke(cli, [*args, "--threads", "1"])
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_decode_step_logits_are_the_callers_own(shared_session):
    """Decode steps reuse bound buffers; the logits a step returns must not change afterwards."""
    cache = shared_session.empty_cache(2, capacity=12)
    ids = np.array([[3, 4, 5], [6, 7, 8]])
    mask = np.ones((2, 3), dtype=np.int64)
    _, cache = shared_session.run(ids, mask, np.array([[0, 1, 2]] * 2), cache)
    returned = []
    for step in range(4):
        mask = np.ones((2, 4 + step), dtype=np.int64)
        logits, cache = shared_session.run(
            np.array([[9 + step], [20 + step]]), mask, np.full((2, 1), 3 + step), cache
        )
        returned.append((logits, logits.copy()))
    assert all(np.array_equal(kept, copy) for kept, copy in returned)
    assert not np.array_equal(returned[0][1], returned[1][1])  # the steps did differ
