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
model's own. Positions: the total length S is the attention mask's width, so
``seqlens_k = S - 1`` for every row and new tokens land at cache rows [S - T, S). Left padding is
kept in the cache (as in the default graph) and masked by the model's own additive mask, passed
as ``attention_bias``.

The file needs ONNX Runtime (the contrib op is not standard ONNX), which is why it is an option.
"""

from __future__ import annotations

import onnx
import torch
from torch.nn import functional as F

from runtime.errors import ExportError

GQA_OP = "GroupQueryAttention"
GQA_DOMAIN = "com.microsoft"
# GroupQueryAttention's input slots: query, key, value, past_key, past_value, seqlens_k,
# total_sequence_length, cos_cache, sin_cache, position_ids, attention_bias. Unused ones are "".
_GQA_SLOTS = (0, 3, 4, 5, 6, 10)
_GQA_ARITY = 11


class _GroupQueryAttention(torch.autograd.Function):
    """Eager: what GroupQueryAttention computes (concat semantics). Traced: the contrib op."""

    @staticmethod
    def forward(
        ctx, qkv, past_key, past_value, seqlens_k, total_length, bias, n_head: int, head_dim: int
    ):
        # Shape-free on purpose: under the tracer, sizes are tensors.
        q, k, v = (t.unflatten(-1, (n_head, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        k = torch.cat([past_key, k], dim=2)
        v = torch.cat([past_value, v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return y.transpose(1, 2).flatten(2), k, v

    @staticmethod
    def symbolic(
        g, qkv, past_key, past_value, seqlens_k, total_length, bias, n_head: int, head_dim: int
    ):
        # Inputs are compacted here; place_gqa_inputs() moves them to their slots afterwards
        # (the TorchScript exporter has no clean way to spell an omitted optional input).
        output, present_key, present_value = g.op(
            f"{GQA_DOMAIN}::{GQA_OP}",
            qkv,
            past_key,
            past_value,
            seqlens_k,
            total_length,
            bias,
            num_heads_i=n_head,
            kv_num_heads_i=n_head,
            outputs=3,
        )
        # Declared types, so the exporter's shape inference does not have to guess.
        output.setType(qkv.type().with_sizes([None, None, n_head * head_dim]))
        for present in (present_key, present_value):
            present.setType(past_key.type().with_sizes([None, n_head, None, head_dim]))
        return output, present_key, present_value


class FusedAttention:
    """An attention kernel (``gpt_core.model.AttentionKernel``) traced as GroupQueryAttention.

    Only for the cached, masked forward the export traces: a past and a mask are required.
    ``head_dim`` is given up front because, under the tracer, sizes read from tensors are traced
    values, not the Python ints the op's declared output types need.
    """

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

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
        # S, the mask's width, as an int32 tensor built from public ops only, so the tracer keeps
        # it dynamic (a Python int from .shape would be frozen into the graph as a constant).
        total = torch.ones_like(attn_bias[0, 0, 0], dtype=torch.int32).sum(dtype=torch.int32)
        seqlens_k = torch.zeros_like(attn_bias[:, 0, 0, 0], dtype=torch.int32) + (total - 1)
        y, key, value = _GroupQueryAttention.apply(
            qkv, past[0], past[1], seqlens_k, total, attn_bias, n_head, self.head_dim
        )
        return y, (key, value)


def place_gqa_inputs(graph: onnx.GraphProto) -> int:
    """Move each traced GroupQueryAttention's inputs to their real slots; returns how many."""
    count = 0
    for node in graph.node:
        if node.op_type != GQA_OP or node.domain != GQA_DOMAIN:
            continue
        given = list(node.input)
        slots = [""] * _GQA_ARITY
        for slot, name in zip(_GQA_SLOTS, given, strict=True):
            slots[slot] = name
        del node.input[:]
        node.input.extend(slots)
        count += 1
    return count
