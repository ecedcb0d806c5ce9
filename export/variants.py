"""Export variants: int8 weights, fp16, and ONNX Runtime graph optimisation.

Each takes and returns an ``onnx.ModelProto``; the exporter applies them after tracing, and the
parity check that follows states each variant's tolerance.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx

from export.onnx_export import untie_embedding


def quantize_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantisation of every MatMul weight, the output head included.

    The head gets its own copy of the (transposed) embedding first: quantised while tied, the
    embedding would be dequantised into the head at every step, which is slower than fp32.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    untie_embedding(proto)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on every call
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, src)
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            per_channel=False,
        )
        root.setLevel(level)
        return onnx.load(dst)


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights, activations and KV cache; LayerNorm, Softmax and the logits stay fp32.

    LayerNorm statistics and softmax sums overflow or lose precision in fp16 (ANCHORS pitfall 8);
    keeping logits fp32 also keeps sampling exact. The mask uses dtype-min, representable in fp16.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(
        proto,
        keep_io_types=["input_ids", "attention_mask", "position_ids", "logits"],
        op_block_list=["LayerNormalization", "Softmax"],
        disable_shape_infer=False,
    )
    return converted


def optimize(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """ONNX Runtime's extended graph optimisations, saved into the file (runtime-specific ops).

    Returns the optimised model and the fusions that actually happened, as "FusedOp xN" strings,
    found by comparing operator counts before and after.
    """
    import onnxruntime as ort

    before = Counter(node.op_type for node in proto.graph.node)
    props = list(proto.metadata_props)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "opt.onnx"
        onnx.save(proto, src)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(dst)
    after = Counter(node.op_type for node in optimized.graph.node)
    fusions = [f"{op} x{count}" for op, count in sorted(after.items()) if count > before.get(op, 0)]
    del optimized.metadata_props[:]
    optimized.metadata_props.extend(props)
    return optimized, fusions
