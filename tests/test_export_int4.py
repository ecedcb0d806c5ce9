"""`--quantize int4`: 4-bit MatMulNBits weights; the tied head and embedding in 8-bit blocks,
stored once (MatMulNBits head, GatherBlockQuantized lookup over the same bytes).

A tiny model (2 layers, 64 wide) is exported with both cache kinds (the in-place one also with
--optimize's fusions) and checked against PyTorch; the figures each test bounds were measured on
these models (see the comments). Its 64-wide matrices are narrower than the default 128-weight
block, so they also exercise the per-matrix block choice.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from reliability_helpers import one_line_error

from export import ExportOptions, export_onnx
from export import variants as variants_module
from export.parity import TOLERANCES, verify_parity
from export.variants import INT4_BLOCK_SIZE, _nbits_block
from gpt_core.checkpoint import save_model
from gpt_core.config import GPTConfig
from gpt_core.model import GPT
from gptkit.cli import cli
from runtime.errors import ExportError
from runtime.metadata import ModelMetadata

SEED = 1234
GREEDY_TOKENS = 32


def make_model(**overrides) -> GPT:
    """A tiny GPT with std-0.05 matrices (as test_parity's): logits spread enough for greedy
    decoding to walk through many ids, so agreement figures mean something."""
    torch.manual_seed(SEED)
    model = GPT(GPTConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


CASES = {
    "concat": ExportOptions(quantize="int4"),
    "inplace+optimize": ExportOptions(quantize="int4", kv_cache="inplace", optimize=True),
}


@pytest.fixture(scope="module")
def exports(model, bpe_tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("int4")
    return {
        name: export_onnx(model, bpe_tokenizer, directory / f"{name}.onnx", options=options)
        for name, options in CASES.items()
    }


def metadata(path) -> ModelMetadata:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)


@pytest.mark.parametrize("name", list(CASES))
def test_int4_parity_with_pytorch(model, exports, name) -> None:
    """Measured on this model: max |diff| ~0.3-0.4, argmax agreement ~0.77 and 7/16 greedy
    tokens (random weights: near-flat logits make 4-bit rounding flip near-ties)."""
    result = exports[name]
    assert result.parity is not None and result.parity.ok  # the exporter's own check passed
    report = verify_parity(model, result.path, variant="int4", greedy_tokens=GREEDY_TOKENS)
    assert report.ok, report.failures
    assert report.tolerance == TOLERANCES["int4"]
    assert 0.05 < report.worst < 1.0  # 4-bit rounding shows, but far below the tolerance
    assert report.argmax_agreement >= 0.6
    assert report.greedy_match >= 2
    assert "shared buffer" in " ".join(report.max_diff) or name == "concat"


def test_int4_graph_stores_the_embedding_once_in_8_bits(model, exports) -> None:
    cfg = model.config
    proto = onnx.load(exports["concat"].path)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 4 * cfg.n_layer + 1  # qkv, proj, fc, mlp proj + head
    assert ops.count("GatherBlockQuantized") == 1
    assert "MatMulInteger" not in ops
    shapes = {(cfg.vocab_size, cfg.n_embd), (cfg.n_embd, cfg.vocab_size)}
    assert not [i.name for i in proto.graph.initializer if tuple(i.dims) in shapes]
    # The lookup reads the head's own packed weight (through a Reshape), not a copy of it.
    nodes = {out: n for n in proto.graph.node for out in n.output}
    gather = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(
        n
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
        and any(a.name == "N" and a.i == cfg.vocab_size for a in n.attribute)
    )
    assert nodes[gather.input[0]].input[0] == head.input[1]
    assert gather.input[2] == head.input[2]  # the same scales
    bits = {a.name: a.i for a in head.attribute}["bits"]
    assert bits == 8 == {a.name: a.i for a in gather.attribute}["bits"]
    # 64-wide matrices get 64-weight blocks, the 256-row MLP projection the default 128
    blocks = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            blocks[attrs["K"]] = attrs["block_size"]
    assert blocks == {cfg.n_embd: cfg.n_embd, 4 * cfg.n_embd: INT4_BLOCK_SIZE}
    meta = metadata(exports["concat"].path).export
    assert meta["quantize"] == "int4" and meta["int4"]["block_sizes"] == [64, 128]
    assert meta["int4"]["head"].startswith("8-bit, tied")


def test_int4_file_is_smaller_than_int8(model, bpe_tokenizer, exports, tmp_path) -> None:
    int8 = export_onnx(
        model, bpe_tokenizer, tmp_path / "int8.onnx", options=ExportOptions(quantize="int8")
    )
    # int8 stores its tied embedding once, in int8, too (tiny: 0.69x; GPT-2 124M: 89 vs 128 MB)
    assert exports["concat"].size_bytes < 0.8 * int8.size_bytes


def test_inplace_optimized_int4_keeps_the_fusions(exports) -> None:
    result = exports["inplace+optimize"]
    ops = {n.op_type for n in onnx.load(result.path).graph.node}
    assert {"GroupQueryAttention", "SkipLayerNormalization", "FastGelu", "MatMulNBits"} <= ops
    assert any(note.startswith("int4:") for note in result.notes)


def test_the_runtime_decodes_both_cache_kinds_alike(exports) -> None:
    """runtime.load runs the files (the in-place one on its shared buffer); both carry the same
    4-bit weights, so their greedy tokens agree."""
    import runtime.model

    prompt = [5, 17, 42, 99, 3]
    tokens = {}
    for name, result in exports.items():
        loaded = runtime.model.load(result.path, threads=1)
        stream = loaded.generate_tokens(
            [prompt], max_new_tokens=16, temperature=0.0, stop_at_eot=False
        )
        tokens[name] = [t.id for t in stream]
    assert len(tokens["concat"]) == 16 and len(set(tokens["concat"])) > 1
    assert tokens["concat"] == tokens["inplace+optimize"]


@pytest.mark.parametrize(
    ("k", "block"),
    [(768, 128), (3072, 128), (64, 64), (48, 16), (96, 32), (40, 0)],
)
def test_block_size_fits_each_matrix(k, block) -> None:
    assert _nbits_block(k, INT4_BLOCK_SIZE) == block


def test_matrices_narrower_than_a_block_stay_fp32(bpe_tokenizer, tmp_path) -> None:
    """n_embd 40: no power-of-two block >= 16 divides it, so the attention matrices and the head
    stay fp32 (the head tied to the fp32 embedding); the 160-row MLP projection gets 32."""
    narrow = make_model(n_embd=40, n_head=2)
    result = export_onnx(
        narrow, bpe_tokenizer, tmp_path / "narrow.onnx", options=ExportOptions(quantize="int4")
    )
    assert result.parity is not None and result.parity.ok
    proto = onnx.load(result.path)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == narrow.config.n_layer  # the MLP projections only
    assert "GatherBlockQuantized" not in ops
    meta = metadata(result.path).export["int4"]
    assert meta["block_sizes"] == [32] and meta["head"] == "fp32 (tied)"


def test_int4_from_the_command_line(runner, bpe_tokenizer, tmp_path) -> None:
    checkpoint = save_model(tmp_path / "step-000010", make_model(), bpe_tokenizer)
    out = tmp_path / "int4.onnx"
    result = runner.invoke(
        cli,
        ["export", str(out), "--checkpoint", str(checkpoint), "--quantize", "int4"],
    )
    assert result.exit_code == 0, result.output
    assert f"Parity with PyTorch (int4, tolerance {TOLERANCES['int4']:g})" in result.stdout
    assert "OVER" not in result.stdout
    assert "int4: 9 MatMul weights in 4-bit blocks of 64/128" in result.stdout
    assert metadata(out).export["quantize"] == "int4"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--dtype", "fp16", "--quantize", "int4"], ["--quantize int4", "cannot be combined"]),
        (["--quantize", "int3"], ["int3"]),
    ],
)
def test_bad_int4_options_are_one_line_errors(runner, bpe_tokenizer, tmp_path, args, fragments):
    checkpoint = save_model(tmp_path / "step-000010", make_model(), bpe_tokenizer)
    out = tmp_path / "m.onnx"
    result = runner.invoke(cli, ["export", str(out), "--checkpoint", str(checkpoint), *args])
    code = 2 if "int3" in args else 1  # click rejects an unknown choice itself
    one_line_error(result, *fragments, code=code)
    assert not out.exists()


def test_options_name_the_quantizations() -> None:
    with pytest.raises(ExportError, match="choose int8 or int4"):
        ExportOptions(quantize="int2").validate()


def test_an_onnxruntime_without_the_ops_is_refused(
    model, bpe_tokenizer, tmp_path, monkeypatch
) -> None:
    """Where ORT cannot run MatMulNBits/GatherBlockQuantized the export stops with one line
    naming the version, and writes nothing."""
    monkeypatch.setattr(variants_module, "_int4_ops_problem", lambda: "no kernel for the op")
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as error:
        export_onnx(model, bpe_tokenizer, out, options=ExportOptions(quantize="int4"))
    message = str(error.value)
    assert "\n" not in message and ort.__version__ in message and "no kernel" in message
    assert not out.exists()


def test_the_probe_passes_on_this_onnxruntime() -> None:
    assert variants_module._int4_ops_problem() is None
