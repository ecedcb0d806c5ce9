"""The exported file: ONNX contract (names, dtypes, dynamic axes), metadata, size, atomic writes, errors.

One tiny seeded model (2 layers, 64 wide) is exported once per session; numerical parity lives in
test_parity.py.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import ExportOptions, export_onnx
from export.options import DEFAULT_OPSET
from export.parity import verify_parity
from gpt_core.config import GPTConfig
from gpt_core.model import GPT
from runtime.errors import ExportError
from runtime.metadata import MODEL_FORMAT_VERSION, ModelMetadata
from runtime.onnx_contract import LOGITS_ALL, input_names, output_names

SEED = 1234


def make_model(**overrides) -> GPT:
    torch.manual_seed(SEED)
    return GPT(GPTConfig.preset("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


@pytest.fixture(scope="module")
def exported(model, bpe_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    result = export_onnx(model, bpe_tokenizer, path, source="unit-test")
    return result


@pytest.fixture(scope="module")
def proto(exported) -> onnx.ModelProto:
    return onnx.load(exported.path)


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_io_names_in_optimum_order(proto) -> None:
    n = GPTConfig.preset("tiny").n_layer
    assert [i.name for i in proto.graph.input] == input_names(n)
    assert [o.name for o in proto.graph.output] == output_names(n)
    assert input_names(2)[3:] == [
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert output_names(2)[1:3] == ["present.0.key", "present.0.value"]


def test_io_dtypes_and_dynamic_axes(proto) -> None:
    cfg = GPTConfig.preset("tiny")
    by_name = {v.name: v for v in [*proto.graph.input, *proto.graph.output]}
    int64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    for name in ("input_ids", "attention_mask", "position_ids"):
        assert by_name[name].type.tensor_type.elem_type == int64
    assert dims(by_name["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(by_name["position_ids"]) == ["batch_size", "sequence_length"]
    assert dims(by_name["attention_mask"]) == ["batch_size", "total_sequence_length"]
    assert dims(by_name["logits"]) == ["batch_size", "sequence_length", cfg.vocab_size]
    past = dims(by_name["past_key_values.1.value"])
    assert past == ["batch_size", cfg.n_head, "past_sequence_length", cfg.head_dim]
    present = dims(by_name["present.1.key"])
    assert present == ["batch_size", cfg.n_head, "total_sequence_length", cfg.head_dim]
    assert by_name["present.0.key"].type.tensor_type.elem_type == f32
    assert by_name["logits"].type.tensor_type.elem_type == f32


def test_opset_is_pinned(proto) -> None:
    default_domain = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert default_domain == [DEFAULT_OPSET]
    onnx.checker.check_model(proto)


def test_metadata_carries_everything_the_runtime_needs(exported, model, bpe_tokenizer) -> None:
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    meta = ModelMetadata.from_props(props, source="test")
    assert props["gptkit.format_version"] == str(MODEL_FORMAT_VERSION)
    assert meta.config == model.config.to_dict()
    assert meta.tokenizer == bpe_tokenizer
    export = meta.export
    assert export["logits"] == LOGITS_ALL
    assert (export["opset"], export["dtype"], export["quantize"]) == (DEFAULT_OPSET, "fp32", None)
    assert export["optimize"] is False and export["source"] == "unit-test"
    assert export["torch_version"] == torch.__version__
    assert export["onnx_version"] == onnx.__version__
    assert export["n_params"] == model.num_params()
    exported_at = datetime.datetime.fromisoformat(export["exported_at"])
    age = datetime.datetime.now(datetime.UTC) - exported_at
    assert datetime.timedelta(0) <= age < datetime.timedelta(hours=1)


def test_tied_embedding_is_stored_once(exported, proto, model) -> None:
    cfg = model.config
    embedding_shapes = {(cfg.vocab_size, cfg.n_embd), (cfg.n_embd, cfg.vocab_size)}
    tables = [i for i in proto.graph.initializer if tuple(i.dims) in embedding_shapes]
    assert len(tables) == 1
    metadata_bytes = sum(len(p.key) + len(p.value) for p in proto.metadata_props)
    embedding_bytes = cfg.vocab_size * cfg.n_embd * 4
    # a second copy of the embedding would add embedding_bytes; graph structure is a few KB
    assert exported.size_bytes < exported.n_params * 4 + metadata_bytes + embedding_bytes // 2
    assert exported.size_bytes == exported.path.stat().st_size


def test_the_fp32_head_reads_wte_in_vocabulary_slices(proto, model) -> None:
    """MatMul(x, Transpose(Slice(wte))) per slice, then Concat: ORT folds and prepacks one slice
    at a time, so loading never holds a whole transposed copy of the embedding next to its
    packed form (split_head)."""
    from export.graph_edits import HEAD_PARTS, embedding_initializer

    nodes = {n.output[0]: n for n in proto.graph.node}
    concat = nodes["logits"]
    assert concat.op_type == "Concat" and len(concat.input) == HEAD_PARTS
    wte = embedding_initializer(proto.graph).name
    rows = 0
    for piece in concat.input:
        matmul = nodes[piece]
        transpose = nodes[matmul.input[1]]
        slice_ = nodes[transpose.input[0]]
        assert (matmul.op_type, transpose.op_type, slice_.op_type) == (
            "MatMul",
            "Transpose",
            "Slice",
        )
        assert slice_.input[0] == wte
        bounds = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
        rows += int(bounds[slice_.input[2]][0] - bounds[slice_.input[1]][0])
    assert rows == model.config.vocab_size


@pytest.mark.parametrize(("batch", "past", "seq"), [(1, 0, 1), (1, 1, 1), (4, 0, 9), (3, 9, 2)])
def test_every_axis_is_dynamic(exported, model, batch, past, seq) -> None:
    """Export used sizes 2..4; sizes 0, 1 and others must run and give the right shapes."""
    cfg = model.config
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    feed = {
        "input_ids": np.zeros((batch, seq), np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)),
    }
    for name in input_names(cfg.n_layer)[3:]:
        feed[name] = np.zeros((batch, cfg.n_head, past, cfg.head_dim), np.float32)
    logits, *presents = session.run(None, feed)
    assert logits.shape == (batch, seq, cfg.vocab_size)
    assert all(p.shape == (batch, cfg.n_head, past + seq, cfg.head_dim) for p in presents)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("training", [True, False])
def test_export_leaves_the_model_untouched(bpe_tokenizer, tmp_path, training) -> None:
    model = make_model(dropout=0.1).train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, bpe_tokenizer, tmp_path / "m.onnx")
    assert model.training is training  # restored after the eval-mode trace
    assert all(m.training is training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and the file was traced in eval mode: dropout would make parity fail
    assert verify_parity(model, tmp_path / "m.onnx").ok


def test_a_non_fp32_model_is_exported_from_an_fp32_copy(bpe_tokenizer, tmp_path) -> None:
    model = make_model().to(torch.bfloat16)
    export_onnx(model, bpe_tokenizer, tmp_path / "m.onnx")
    assert next(model.parameters()).dtype == torch.bfloat16
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].type == "tensor(float)"


@pytest.mark.parametrize("opset", [19, 20])
def test_other_opsets(model, bpe_tokenizer, tmp_path, opset) -> None:
    result = export_onnx(model, bpe_tokenizer, tmp_path / "m.onnx", options=ExportOptions(opset))
    proto = onnx.load(result.path)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [opset]
    report = verify_parity(model, result.path, decode_steps=2, greedy_tokens=4)
    assert report.worst < 1e-4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ExportOptions(opset=9), "opset 9 is not supported"),
        (ExportOptions(opset=21), "opset 21 is not supported"),
        (ExportOptions(dtype="bf16"), "unknown dtype"),
        (ExportOptions(quantize="int3"), "unknown quantization"),
        (ExportOptions(dtype="fp16", quantize="int8"), "cannot be combined"),
    ],
)
def test_unsupported_options_are_refused(model, bpe_tokenizer, tmp_path, options, message) -> None:
    with pytest.raises(ExportError, match=message) as error:
        export_onnx(model, bpe_tokenizer, tmp_path / "m.onnx", options=options)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_output_paths_are_refused(model, bpe_tokenizer, tmp_path) -> None:
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(model, bpe_tokenizer, tmp_path)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, bpe_tokenizer, tmp_path / "missing" / "m.onnx")


def test_unwritable_directory_is_refused(model, bpe_tokenizer, tmp_path, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: pretend to be a normal user
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
        )
    with pytest.raises(ExportError, match="permission denied") as error:
        export_onnx(model, bpe_tokenizer, locked / "m.onnx")
    assert "\n" not in str(error.value)
    assert list(locked.iterdir()) == []


def test_tokenizer_larger_than_the_model_is_refused(bpe_tokenizer, tmp_path) -> None:
    model = make_model(vocab_size=300)
    with pytest.raises(ExportError, match="do not belong together"):
        export_onnx(model, bpe_tokenizer, tmp_path / "m.onnx")


def existing_good_file(directory: Path) -> tuple[Path, bytes]:
    path = directory / "model.onnx"
    path.write_bytes(b"a good model from yesterday")
    return path, path.read_bytes()


def test_failed_trace_keeps_the_old_file(model, bpe_tokenizer, tmp_path, monkeypatch) -> None:
    path, old = existing_good_file(tmp_path)

    def broken_trace(*args, **kwargs):
        raise ExportError("boom")

    monkeypatch.setattr("export.onnx_export.trace", broken_trace)
    with pytest.raises(ExportError, match="boom"):
        export_onnx(model, bpe_tokenizer, path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_failed_write_keeps_the_old_file(model, bpe_tokenizer, tmp_path, monkeypatch) -> None:
    """A crash half-way through writing (disk full) leaves the old file and no temp file."""
    path, old = existing_good_file(tmp_path)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ExportError, match="No space left on device") as error:
        export_onnx(model, bpe_tokenizer, path)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_successful_export_replaces_the_old_file(model, bpe_tokenizer, tmp_path) -> None:
    path, _ = existing_good_file(tmp_path)
    export_onnx(model, bpe_tokenizer, path)
    onnx.checker.check_model(onnx.load(path))
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_exporter_failures_become_one_line_errors(
    model, bpe_tokenizer, tmp_path, monkeypatch
) -> None:
    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::foo' is not supported.\nstack ...")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(
        ExportError, match=f"failed at opset {DEFAULT_OPSET}: Exporting the"
    ) as error:
        export_onnx(model, bpe_tokenizer, tmp_path / "m.onnx")
    assert "\n" not in str(error.value)
