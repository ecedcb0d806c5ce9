"""Export variants: ONNX Runtime transformer fusions, int8 weights, fp16.

Each takes and returns an ``onnx.ModelProto``. The exporter applies them after tracing in this
order: optimize (fusion patterns are written for fp32 graphs), then int8 or fp16. The parity check
that follows states each variant's tolerance (``export.parity.TOLERANCES``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from export.graph_edits import sort_topologically, tie_embedding, untie_embedding

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


def quantize_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantisation of every MatMul weight, the output head included.

    The head gets its own copy of the (transposed) embedding first: quantised while tied, the
    embedding would be dequantised into the head at every step, which is slower than the fp32 head. The embedding Gather keeps its fp32 table.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    untie_embedding(proto)
    with tempfile.TemporaryDirectory() as tmp, _quiet("root"):
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, src)
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            per_channel=False,
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
