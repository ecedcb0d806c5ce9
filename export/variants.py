"""Export variants: ONNX Runtime transformer fusions, int8 or int4 weights, fp16.

Each takes and returns an ``onnx.ModelProto``. The exporter applies them after tracing in this
order: optimize (fusion patterns are written for fp32 graphs), then int8, int4 or fp16. The parity
check that follows states each variant's tolerance (``export.parity.TOLERANCES``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from export.graph_edits import (
    gather_from_int8_head,
    gather_from_nbits_head,
    head_matmul,
    sort_topologically,
    tie_embedding,
    untie_embedding,
)
from runtime.errors import ExportError

# Ops that stay fp32 in the fp16 variant: normalisation statistics and softmax sums lose too much
# precision (or overflow) in fp16 (ORT's own GPT-2 fp16 recipe keeps the same ops in fp32).
FP32_OPS = ["LayerNormalization", "Softmax"]


def optimize(proto: onnx.ModelProto, n_head: int, n_embd: int) -> tuple[onnx.ModelProto, dict]:
    """ONNX Runtime's transformer fusions for GPT-2, saved into the file.

    Returns the model and the fusions that actually happened, as ``{fused op: count}`` (zero
    counts dropped). On gptkit's graph this is SkipLayerNormalization and FastGelu; ORT's GPT-2
    Attention fusion pattern-matches Hugging Face's graph and does not apply to gptkit's graph (attention is written with SDPA's ops).
    The fused ops are ``com.microsoft`` contrib ops: the file then runs on ONNX Runtime only.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet("onnxruntime.transformers"):
        optimized = optimize_model(
            proto,
            model_type="gpt2",
            num_heads=n_head,
            hidden_size=n_embd,
            opt_level=0,  # Python fusions only; ORT applies its own level at session load anyway
        )
        stats = optimized.get_fused_operator_statistics()
    model = optimized.model
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    tie_embedding(model)  # in case a pass folded the head's Transpose into a second copy
    return model, {op: n for op, n in stats.items() if n}


def quantize_int8(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Dynamic int8 quantisation of every MatMul weight, the output head included.

    The head gets its own copy of the (transposed) embedding first: quantised while tied, the
    embedding would be dequantised into the head at every step, which is slower than the fp32
    head. Then the token lookup reads the head's int8 weight (``gather_from_int8_head``), so the
    embedding is stored once, in int8, instead of a second fp32 table (GPT-2: 154 MB of 282).
    Returns the graph and whether the lookup was tied to the head.
    """
    head = head_matmul(proto.graph)
    untie_embedding(proto)
    if head is None or not head.name:
        return _quantize_dynamic_int8(proto), False
    body = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name != head.name]
    quantized = _quantize_dynamic_int8(proto, body) if body else proto
    # The head per channel (one scale per vocabulary entry), so each embedding row read from it
    # keeps its own range: with one scale for the table, a few large-norm rows would set the step
    # for every row. (On the test models both agree alike; speed is the same within noise.)
    quantized = _quantize_dynamic_int8(quantized, [head.name], per_channel=True)
    return quantized, gather_from_int8_head(quantized, head.input[1])


# int4 defaults, chosen by measurement (issue 15; a trained small-cpu model against its fp32
# export, random GPT-2 124M for speed): with the 8-bit head, blocks of 32 or asymmetric blocks
# agree no better (argmax 0.991 / 0.991 vs 0.990) and 32 is slower and larger; accuracy_level 0
# agrees the same and decodes about half as fast; a 4-bit head (tied or not) drops argmax
# agreement to ~0.955 and greedy runs to a few tokens, where int8 keeps 0.993.
INT4_BLOCK_SIZE = 128  # weights per scale along K
INT4_SYMMETRIC = True  # no zero points: smaller, as accurate here as asymmetric
INT4_ACCURACY_LEVEL = 4  # int8 activations in MatMulNBits: much faster on CPUs with VNNI
INT4_HEADS = ("tied", "tied8", "untied", "int8")  # how the output head is stored (see below)
INT4_HEAD = "tied8"  # 8-bit head and embedding, stored once: int8's agreement, 4-bit body
MIN_NBITS_BLOCK = 16  # MatMulNBits' smallest block (a power of two >= 16)


def quantize_int4(
    proto: onnx.ModelProto,
    *,
    block_size: int = INT4_BLOCK_SIZE,
    symmetric: bool = INT4_SYMMETRIC,
    accuracy_level: int = INT4_ACCURACY_LEVEL,
    head: str = INT4_HEAD,
) -> tuple[onnx.ModelProto, dict]:
    """4-bit block quantisation of the MatMul weights with ONNX Runtime's MatMulNBitsQuantizer.

    Each MatMul with a constant [K, N] weight becomes a ``MatMulNBits`` (com.microsoft): blocks
    of ``block_size`` weights along K share one fp32 scale (and, unless ``symmetric``, a 4-bit
    zero point). ``accuracy_level`` 4 lets the kernel quantise the activations to int8 on the
    fly (int8 dot products); 0 dequantises the weights and computes in fp32.

    Small models: a matrix whose K is not a multiple of ``block_size`` (the ``tiny`` preset's 64)
    gets the largest power-of-two block that divides K instead, and one with K not a multiple of
    16 stays fp32, so a block never pads past the matrix.

    The tied head: the quantizer only sees constant weights, and the head reads
    Transpose(wte), so it is untied first. ``head`` then decides how it is stored:
    ``tied`` 4-bit head, with the token lookup a GatherBlockQuantized over the same 4-bit bytes
    (the embedding stored once, in 4 bits); ``tied8`` the same with the head and embedding in
    8-bit blocks (MatMulNBits bits=8); ``untied`` 4-bit head next to the fp32 embedding;
    ``int8`` the head as in ``--quantize int8`` (MatMulInteger) next to the fp32 embedding.
    Returns the model and a summary for the export metadata.
    """
    quantizer_class = _nbits_quantizer()
    if head not in INT4_HEADS:
        raise ExportError(f"unknown int4 head {head!r}; choose {' or '.join(INT4_HEADS)}")
    graph = proto.graph
    for index, node in enumerate(graph.node):  # the quantizer selects nodes by name
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    tied = head_matmul(graph)
    head_name = tied.name if tied is not None else None
    weights = {i.name: i for i in graph.initializer}
    head_k = None
    if tied is not None:
        transpose_input = next(n.input[0] for n in graph.node if tied.input[1] in n.output)
        head_k = int(weights[transpose_input].dims[1])
    if head_name is not None and head_k is not None and _nbits_block(head_k, block_size):
        untie_embedding(proto)
        weights = {i.name: i for i in graph.initializer}
    else:
        head_name = None  # left tied, fp32 (split into slices below like an fp32 export)
    if head_name is not None and head == "int8":
        proto = _quantize_dynamic_int8(proto, [head_name])
        graph = proto.graph
        weights = {i.name: i for i in graph.initializer}
    groups: dict[str, tuple[int, int]] = {}  # MatMul name -> (bits, block)
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            continue
        block = _nbits_block(int(weight.dims[0]), block_size)
        if block:
            groups[node.name] = (8 if node.name == head_name and head == "tied8" else 4, block)
    with _quiet("root"), _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        for bits, block in sorted(set(groups.values())):
            quantizer = quantizer_class(
                proto,
                bits=bits,
                block_size=block,
                is_symmetric=symmetric,
                accuracy_level=accuracy_level or None,
                # everything else waits for its own pass or stays fp32 (no block fits it)
                nodes_to_exclude=[
                    n.name for n in proto.graph.node if groups.get(n.name) != (bits, block)
                ],
            )
            quantizer.process()
            proto = quantizer.model.model
    graph = proto.graph
    stored = "fp32 (tied)" if head_name is None else ("int8" if head == "int8" else "4-bit")
    if head_name is not None and head in ("tied", "tied8"):
        bits = groups[head_name][0]
        nbits_head = next(n for n in graph.node if n.name == f"{head_name}_Q{bits}")
        if gather_from_nbits_head(proto, nbits_head):
            stored = f"{bits}-bit, tied to a GatherBlockQuantized embedding"
        else:
            stored = f"{bits}-bit (embedding fp32: its blocks do not tile n_embd)"
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    summary = {
        "block_size": block_size,
        "symmetric": symmetric,
        "accuracy_level": accuracy_level,
        "head": stored,
        "matmuls": len(groups),
        "block_sizes": sorted({block for _, block in groups.values()}),
    }
    return proto, summary


def _nbits_block(k: int, block_size: int) -> int:
    """The block for a K-row weight: ``block_size`` or the largest power of two below it that
    divides K; 0 when none >= MIN_NBITS_BLOCK does (that weight stays fp32)."""
    block = block_size
    while block >= MIN_NBITS_BLOCK:
        if k % block == 0:
            return block
        block //= 2
    return 0


def _nbits_quantizer():  # -> type[MatMulNBitsQuantizer]
    """ONNX Runtime's MatMulNBitsQuantizer, or an ExportError saying which version has it.

    The module appeared as ``matmul_nbits_quantizer`` in ONNX Runtime 1.20 (``matmul_4bits``
    before); 8-bit MatMulNBits and GatherBlockQuantized over uint8 data (the tied head and
    embedding) are newer still, so an ORT that cannot run a probe graph with those ops is
    refused here, before any work (gptkit's minimum, 1.17, is; tested with 1.32).
    """
    import onnxruntime

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:  # the module calls logging.basicConfig(level=INFO) on import: undo that below
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        raise ExportError(
            f"--quantize int4 needs ONNX Runtime's MatMulNBitsQuantizer (onnxruntime >= 1.20); "
            f"this is onnxruntime {onnxruntime.__version__}: pip install -U onnxruntime"
        ) from None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    problem = _int4_ops_problem()
    if problem:
        raise ExportError(
            f"--quantize int4 needs MatMulNBits (4 and 8 bits) and GatherBlockQuantized, which "
            f"onnxruntime {onnxruntime.__version__} cannot run ({problem}); "
            "pip install -U onnxruntime (tested with 1.32)"
        )
    return MatMulNBitsQuantizer


def _int4_ops_problem() -> str | None:
    """Load and run a tiny graph with both ops the int4 export writes; None when that works."""
    import numpy as np
    import onnxruntime

    helper, TP = onnx.helper, onnx.TensorProto
    packed4 = onnx.numpy_helper.from_array(np.full((16, 1, 8), 0x88, np.uint8), "b4")
    packed8 = onnx.numpy_helper.from_array(np.full((2, 1, 16), 0x80, np.uint8), "b8")
    scales4 = onnx.numpy_helper.from_array(np.ones((16, 1), np.float32), "s4")
    scales8 = onnx.numpy_helper.from_array(np.ones((2, 1), np.float32), "s8")
    rows = onnx.numpy_helper.from_array(np.full((2, 16), 0x80, np.uint8), "rows")
    nodes = [  # what an int4 export writes: an 8-bit tied lookup, 4-bit and 8-bit MatMuls
        helper.make_node(
            "GatherBlockQuantized",
            ["rows", "ids", "s8"],
            ["x"],
            domain="com.microsoft",
            bits=8,
            block_size=16,
            gather_axis=0,
            quantize_axis=1,
        ),
        helper.make_node(
            "MatMulNBits",
            ["x", "b4", "s4"],
            ["h"],
            domain="com.microsoft",
            K=16,
            N=16,
            bits=4,
            block_size=16,
            accuracy_level=4,
        ),
        helper.make_node(
            "MatMulNBits",
            ["h", "b8", "s8"],
            ["y"],
            domain="com.microsoft",
            K=16,
            N=2,
            bits=8,
            block_size=16,
            accuracy_level=4,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "int4_probe",
        [helper.make_tensor_value_info("ids", TP.INT64, [1])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [1, 2])],
        [packed4, packed8, scales4, scales8, rows],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    try:
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        session.run(None, {"ids": np.array([1], np.int64)})
    except Exception as e:  # ORT raises several types for unknown ops and bad type bindings
        return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return None


def _quantize_dynamic_int8(
    proto: onnx.ModelProto, nodes: list[str] | None = None, *, per_channel: bool = False
) -> onnx.ModelProto:
    """Dynamic QInt8 (MatMulInteger) for every MatMul weight, or only the named MatMuls; one
    scale per weight, or per output column with ``per_channel``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _quiet("root"):
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, src)
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            # fused contrib ops (after --optimize) have no type info the quantizer can read
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return onnx.load(dst)


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights, activations and KV cache; LayerNorm, Softmax and the logits stay fp32.

    Inputs ids/mask/positions keep their int64 type and ``logits`` stays fp32, so sampling is
    unchanged; the past/present tensors become fp16 (half the cache memory). The attention mask's
    dtype-min constant is clamped to fp16's -65504 by the converter, still far below any score.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet("onnxruntime.transformers"):
        converted = convert_float_to_float16(
            proto,
            keep_io_types=["logits"],
            op_block_list=FP32_OPS,
        )
    sort_topologically(converted.graph)  # the converter appends its Casts out of order
    return converted


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library's INFO/WARNING chatter (quantize_dynamic's pre-processing hint, ...)."""
    logger = logging.getLogger() if logger_name == "root" else logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
