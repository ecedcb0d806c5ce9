"""The ONNX contract of a gptkit export: its input and output names, axes and modes.

One graph serves the prompt (a past of length 0) and every cached step, with the names Hugging
Face Optimum and onnxruntime-genai's ``decoder`` type use::

    input_ids                  int64 [batch_size, sequence_length]
    attention_mask             int64 [batch_size, total_sequence_length]   1 = token, 0 = padding
    position_ids               int64 [batch_size, sequence_length]
    past_key_values.{i}.key    float [batch_size, n_head, past_sequence_length, head_dim] (.value)
    -> logits                  float [batch_size, sequence_length, vocab_size] (every position)
    -> present.{i}.key         float [batch_size, n_head, total_sequence_length, head_dim] (.value)

where total = past + sequence. The exporter writes these names, the runtime binds them, parity
and the benchmarks read them: this module is the one place they are spelled out. It is torch-free
and imports nothing, so every layer can use it.
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Per-layer cache names; format with the layer index. The %d forms are onnxruntime-genai's
# genai_config.json templates for the same names.
PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

# Symbolic axis names, as Optimum names them.
BATCH_AXIS = "batch_size"
SEQUENCE_AXIS = "sequence_length"
PAST_AXIS = "past_sequence_length"
TOTAL_AXIS = "total_sequence_length"

# How the graph treats its cache, stored as ``export["kv_cache"]`` in the file's metadata.
# concat: standard ONNX; present = past + new, a new tensor every step.
# inplace: ONNX Runtime's GroupQueryAttention; when past and present are bound to one buffer of
#   fixed capacity the new positions are written into it, otherwise it behaves like concat.
KV_CONCAT = "concat"
KV_INPLACE = "inplace"
KV_CACHE_MODES = (KV_CONCAT, KV_INPLACE)

# ``export["logits"]``: every export returns logits for every position (score() needs them).
LOGITS_ALL = "all"

# ``export["io"]``: the naming scheme above.
IO_NAMING = "optimum-decoder"


def past_names(n_layer: int) -> list[str]:
    """``past_key_values.{i}.key`` and ``.value`` for every layer, in graph order."""
    return [name.format(i) for i in range(n_layer) for name in (PAST_KEY, PAST_VALUE)]


def present_names(n_layer: int) -> list[str]:
    """``present.{i}.key`` and ``.value`` for every layer, in graph order."""
    return [name.format(i) for i in range(n_layer) for name in (PRESENT_KEY, PRESENT_VALUE)]


def input_names(n_layer: int) -> list[str]:
    """Every graph input, in order."""
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layer)]


def output_names(n_layer: int) -> list[str]:
    """Every graph output, in order."""
    return [LOGITS, *present_names(n_layer)]


def past_for(present_name: str) -> str:
    """The past input a present output feeds on the next step (``present.3.key`` -> past's)."""
    if not present_name.startswith(PRESENT_PREFIX):
        raise ValueError(f"{present_name!r} is not a present.* output")
    return PAST_PREFIX + present_name[len(PRESENT_PREFIX) :]


def genai_template(name: str) -> str:
    """A per-layer name in onnxruntime-genai's ``%d`` form (``past_key_values.%d.key``)."""
    return name.replace("{}", "%d")


def dynamic_axes(n_layer: int) -> dict[str, dict[int, str]]:
    """Every dynamic axis of every input and output, by name (the exporter's ``dynamic_axes``)."""
    axes: dict[str, dict[int, str]] = {
        INPUT_IDS: {0: BATCH_AXIS, 1: SEQUENCE_AXIS},
        ATTENTION_MASK: {0: BATCH_AXIS, 1: TOTAL_AXIS},
        POSITION_IDS: {0: BATCH_AXIS, 1: SEQUENCE_AXIS},
        LOGITS: {0: BATCH_AXIS, 1: SEQUENCE_AXIS},
    }
    for name in past_names(n_layer):
        axes[name] = {0: BATCH_AXIS, 2: PAST_AXIS}
    for name in present_names(n_layer):
        axes[name] = {0: BATCH_AXIS, 2: TOTAL_AXIS}
    return axes
