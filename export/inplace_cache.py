"""The ``--kv-cache inplace`` graph: attention fused into ONNX Runtime's GroupQueryAttention.

The default export concatenates past and new keys/values in every layer at every step, so a
decode step copies the whole cache, a cost that grows with the position. This variant keeps the
same inputs and outputs but computes attention with the ``com.microsoft`` contrib op
GroupQueryAttention (num_heads == kv_num_heads, i.e. plain multi-head attention), which

* reads the packed c_attn output directly (no split/reshape/transpose/softmax nodes per layer);
* writes the new keys/values *into* the past buffer when ``past_key_values.{i}.*`` and
  ``present.{i}.*`` are bound to the same OrtValue of fixed capacity (buffer sharing, as
  onnxruntime-genai's ``past_present_share_buffer``), so a step costs what its new token costs;
* still behaves like the default graph when they are not shared: a past of length P gives a
  present of length P + T, so parity checks and other callers can use it like the default, with
  one exception: ONNX Runtime refuses several new tokens for a batch > 1 on a non-empty past
  ("batch_size must be 1 when sequence_length > 1 and past context is given"). The runtime never
  does that (a prompt starts from an empty cache; decode steps are one token). The op's newer
  ``query_seqlens`` input would lift it but needs a recent ONNX Runtime to load at all.

The export traces ``GPT.forward`` itself with :class:`FusedAttention` swapped in as every block's
attention kernel (``gpt_core.model.attention_kernel``): embeddings, blocks, head and mask are the
model's own. The kernel calls the custom op ``gptkit::group_query_attention`` (PyTorch's own
attention in eager mode, so the traced model still runs), which the dynamo exporter translates
with :data:`TRANSLATION` into the contrib op. Positions: the total length S is the attention mask's width, so
``seqlens_k = S - 1`` for every row and new tokens land at cache rows [S - T, S). Left padding is
kept in the cache (as in the default graph) and masked by the model's own additive mask, passed
as ``attention_bias``.

The file needs ONNX Runtime (the contrib op is not standard ONNX), which is why it is an option.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from onnxscript.values import Op, Opset
from torch.nn import functional as F

from gpt_core.model import GPT
from runtime.errors import ExportError

GQA_OP = "GroupQueryAttention"
GQA_DOMAIN = "com.microsoft"


@torch.library.custom_op("gptkit::group_query_attention", mutates_args=())
def group_query_attention(
    qkv: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_length: torch.Tensor,
    bias: torch.Tensor,
    n_head: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What GroupQueryAttention computes when past and present are not shared (concat semantics).

    qkv (B, T, 3C) packed projections; past_* (B, nh, P, hs); seqlens_k (B,) and total_length ()
    int32, read by the contrib op only; bias (B or 1, 1, T, S) additive mask. Returns the heads'
    output (B, T, C) and the presents (B, nh, S, hs).
    """
    q, k, v = (t.unflatten(-1, (n_head, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    k = torch.cat([past_key, k], dim=2)
    v = torch.cat([past_value, v], dim=2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return y.transpose(1, 2).flatten(2), k, v


@group_query_attention.register_fake
def _group_query_attention_shapes(
    qkv: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_length: torch.Tensor,
    bias: torch.Tensor,
    n_head: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, C3 = qkv.shape
    present = past_key.new_empty((B, n_head, past_key.shape[2] + T, C3 // 3 // n_head))
    return qkv.new_empty((B, T, C3 // 3)), present, torch.empty_like(present)


class FusedAttention:
    """An attention kernel (``gpt_core.model.AttentionKernel``) exported as GroupQueryAttention.

    Only for the cached, masked forward the export traces: a past and a mask are required.
    """

    def __call__(
        self,
        qkv: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        attn_bias: torch.Tensor | None,
        n_head: int,
        dropout_p: float,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if past is None or attn_bias is None:
            raise ExportError("the fused attention kernel needs a KV cache and an attention mask")
        # The op reads each row's past length from seqlens_k (total - 1 for every row: left
        # padding stays in the cache and the mask hides it) and the total from a scalar.
        total = attn_bias.shape[-1]  # S, the mask's width (a symbolic size under export)
        batch = qkv.shape[0]
        seqlens_k = torch.full((batch,), total - 1, dtype=torch.int32, device=qkv.device)
        total_length = torch.full((), total, dtype=torch.int32, device=qkv.device)
        y, key, value = torch.ops.gptkit.group_query_attention(
            qkv, past[0], past[1], seqlens_k, total_length, attn_bias, n_head
        )
        return y, (key, value)


def _gqa_schema() -> onnx.defs.OpSchema:
    """GroupQueryAttention's signature, for ONNX Script (onnx itself knows no contrib ops)."""
    schema = onnx.defs.OpSchema
    param, optional = schema.FormalParameter, schema.FormalParameterOption.Optional
    inputs = [param("query", "T")]
    inputs += [param(name, "T", param_option=optional) for name in ("key", "value")]
    inputs += [param(name, "T", param_option=optional) for name in ("past_key", "past_value")]
    inputs += [param("seqlens_k", "M"), param("total_sequence_length", "M")]
    inputs += [param(name, "T", param_option=optional) for name in ("cos_cache", "sin_cache")]
    inputs += [param("position_ids", "P", param_option=optional)]
    inputs += [param("attention_bias", "T", param_option=optional)]
    outputs = [param(name, "T") for name in ("output", "present_key", "present_value")]
    heads = [
        schema.Attribute(name, schema.AttrType.INT, "", required=True)
        for name in ("num_heads", "kv_num_heads")
    ]
    return schema(
        GQA_OP,
        GQA_DOMAIN,
        1,
        inputs=inputs,
        outputs=outputs,
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("M", ["tensor(int32)"], ""),
            ("P", ["tensor(int64)"], ""),
        ],
        attributes=heads,
    )


_GQA = Op(Opset(GQA_DOMAIN, 1), GQA_OP, _gqa_schema())


def _group_query_attention_onnx(
    qkv, past_key, past_value, seqlens_k, total_length, bias, n_head: int
):  # ONNX Script values: untyped on purpose
    # None is an omitted optional input (written as "" in the node).
    return _GQA(
        qkv,
        None,
        None,
        past_key,
        past_value,
        seqlens_k,
        total_length,
        None,
        None,
        None,
        bias,
        num_heads=n_head,
        kv_num_heads=n_head,
    )


# The dynamo exporter's custom_translation_table for graphs traced with FusedAttention.
TRANSLATION: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.gptkit.group_query_attention.default: _group_query_attention_onnx
}


# ---- an int8 KV cache (`--kv-cache-dtype int8`) ------------------------------------------------
#
# GroupQueryAttention can hold its cache as int8 (attributes k_quant_type / v_quant_type /
# kv_cache_bit_width, inputs k_scale / v_scale): it quantizes the new keys/values with the given
# static scales as it writes them and dequantizes in its QK and SV products. ONNX Runtime's CPU
# kernel has it from 1.27.0 (runtime.session.KV_QUANT_MIN_ORT); the CUDA kernel wants fp16/bf16
# activations with it, so it is a CPU option here. The scales are per channel (one per head and
# head dimension, as KIVI does for keys) from a calibration forward pass. The op also takes int4
# (packed two per byte); on random GPT-2 124M weights that moved logits by up to 2.0 (int8: 0.085),
# so it is not offered.

KV_QUANT_TYPE = "PER_CHANNEL"
KV_INT8_LEVELS = 127.0  # the largest int8 magnitude
# Each channel's range is twice its calibrated maximum: other text reaches past what 256 tokens
# showed (1.5-1.9x on random weights), and saturating there cost a trained small-cpu model up to
# 0.75 in a logit and 1.6 % of its argmaxes; 1.5x-3x all kept greedy agreement (see parity.py).
KV_CALIBRATION_HEADROOM = 2.0
_K_SCALE_INPUT = 12  # GroupQueryAttention's input index of k_scale (v_scale follows)


# Windows of a calibration text used at most: each is one block_size forward pass at export.
MAX_CALIBRATION_WINDOWS = 4
# How much of a calibration file is read: ~1M tokens of English, plenty for the windows, and a
# large corpus is not tokenized whole just to place four windows.
MAX_CALIBRATION_BYTES = 4 * 2**20


def read_calibration_text(path: Path) -> str:
    """The first MAX_CALIBRATION_BYTES of a UTF-8 text file (a character cut at the end is
    dropped); anything that is not UTF-8 text is an ExportError."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CALIBRATION_BYTES)
    except OSError as e:
        raise ExportError(f"cannot read calibration text {path} ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(data) == MAX_CALIBRATION_BYTES and e.start >= len(data) - 3:
            return data[: e.start].decode("utf-8")  # the read ended inside a character
        raise ExportError(
            f"calibration text {path} is not UTF-8 text (byte {e.start}); pass a text file"
        ) from None


def calibration_ids(
    model: GPT, seed: int = 0, text_ids: Sequence[int] | None = None
) -> torch.Tensor:
    """(rows, block_size) ids that reach every position: one row of random tokens, then either
    text the model samples itself from one random token (its own keys and values at every
    position, on its own kind of input: no corpus needs to travel with a checkpoint) or, given
    ``text_ids`` (at least block_size of them), up to MAX_CALIBRATION_WINDOWS windows spread
    evenly over that text (`gptkit export --kv-calibration`: the user's own kind of input)."""
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    random_row = torch.randint(0, cfg.vocab_size, (1, cfg.block_size), generator=generator)
    if text_ids is not None:
        text = torch.tensor(list(text_ids), dtype=torch.long)
        if len(text) < cfg.block_size:
            raise ExportError(
                f"the calibration text is {len(text)} tokens; the KV cache needs at least "
                f"block_size ({cfg.block_size}) to calibrate every position: give a longer text"
            )
        last_start = len(text) - cfg.block_size
        windows = min(MAX_CALIBRATION_WINDOWS, last_start // cfg.block_size + 1)
        starts = torch.linspace(0, last_start, windows).round().long().tolist()
        return torch.stack([random_row[0], *(text[i : i + cfg.block_size] for i in starts)])
    with torch.no_grad():
        sampled = model.generate(
            random_row[:, :1], cfg.block_size - 1, temperature=1.0, generator=generator
        )
    return torch.cat([random_row, sampled[:, : cfg.block_size]])


def kv_cache_scales(model: GPT, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (k_scale, v_scale), each (1, n_head, 1, head_dim) float32: the absolute maximum
    of every key/value channel over forward passes of the rows of ``ids`` (B, T), times the
    headroom, over 127. Values beyond that saturate. One row at a time: a batch would hold
    B x T x vocab logits at once."""
    peaks: list[torch.Tensor] = []  # per layer: (2, 1, n_head, 1, head_dim), keys then values
    with torch.no_grad():
        for row in ids:
            out = model(row[None], use_cache=True)
            row_peaks = [
                torch.stack([t.float().abs().amax(dim=(0, 2), keepdim=True) for t in pair])
                for pair in out.past_key_values
            ]
            if peaks:
                peaks = [torch.maximum(a, b) for a, b in zip(peaks, row_peaks, strict=True)]
            else:
                peaks = row_peaks
    scales = []
    for peak in peaks:
        key, value = (peak * KV_CALIBRATION_HEADROOM).div(KV_INT8_LEVELS).clamp_min(1e-8)
        scales.append((key, value))
    return scales


def kv_scale_names(layer: int) -> tuple[str, str]:
    """The initializers holding a layer's key and value scales."""
    return f"kv_scale.{layer}.key", f"kv_scale.{layer}.value"


def quantize_kv_cache(
    proto: onnx.ModelProto, scales: list[tuple[torch.Tensor, torch.Tensor]]
) -> onnx.ModelProto:
    """Turn an in-place export's fp32 cache into an int8 one, in place.

    Every GroupQueryAttention node gets the quantization attributes and its layer's scales (as
    initializers :func:`kv_scale_names`); every ``past_key_values.*`` input and ``present.*``
    output becomes int8. Nothing else in the graph reads the cache.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    nodes = [n for n in graph.node if n.op_type == GQA_OP and n.domain == GQA_DOMAIN]
    if len(nodes) != len(scales):
        raise ExportError(f"{len(nodes)} GroupQueryAttention nodes but {len(scales)} scale pairs")
    for layer, (node, pair) in enumerate(zip(nodes, scales, strict=True)):
        names = kv_scale_names(layer)
        for name, scale in zip(names, pair, strict=True):
            array = scale.detach().to(torch.float32).cpu().numpy()
            graph.initializer.append(numpy_helper.from_array(array, name))
        inputs = list(node.input) + [""] * max(0, _K_SCALE_INPUT - len(node.input))
        inputs[_K_SCALE_INPUT : _K_SCALE_INPUT + 2] = names
        del node.input[:]
        node.input.extend(inputs)
        for attr in ("k_quant_type", "v_quant_type", "kv_cache_bit_width"):
            for existing in [a for a in node.attribute if a.name == attr]:
                node.attribute.remove(existing)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", KV_QUANT_TYPE),
                helper.make_attribute("v_quant_type", KV_QUANT_TYPE),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    return proto
