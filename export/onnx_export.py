"""Export a GPT with its KV cache to one self-contained ONNX file.

The graph is the model's own cache-aware forward, traced once, with the input and output names
Hugging Face Optimum and onnxruntime-genai's generic ``decoder`` type use::

    input_ids                  int64 [batch, seq]
    attention_mask             int64 [batch, past + seq]     1 = token, 0 = left padding
    position_ids               int64 [batch, seq]
    past_key_values.{i}.key    float [batch, n_head, past, head_dim]    (and .value)
    -> logits                  float [batch, seq, vocab]      every position (metadata: logits=all)
    -> present.{i}.key         float [batch, n_head, past + seq, head_dim]    (and .value)

One graph serves the prompt (past of length 0) and every cached step. The file carries the model
config, the tokenizer and export details in its metadata, so it is the only thing the runtime needs.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from gpt_core.model import GPT
from runtime.errors import ExportError
from runtime.metadata import LOGITS_ALL, ModelMetadata
from runtime.tokenizer import Tokenizer

DEFAULT_OPSET = 17  # TorchScript exporter; 14 is the lowest with the ops we emit
SUPPORTED_OPSETS = range(14, 21)
DTYPES = ("fp32", "fp16")
QUANTIZE = (None, "int8")


def input_names(n_layer: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n_layer):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(n_layer: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layer):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class _CachedDecoder(torch.nn.Module):
    """The GPT with flat cache inputs/outputs, as ONNX sees it."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2))
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=pairs,
        )
        flat = [t for pair in out.past_key_values for t in pair]
        return (out.logits, *flat)


@dataclass
class ExportOptions:
    opset: int = DEFAULT_OPSET
    dtype: str = "fp32"
    quantize: str | None = None
    optimize: bool = False

    def validate(self) -> None:
        if self.opset not in SUPPORTED_OPSETS:
            raise ExportError(
                f"opset {self.opset} is not supported; use one of "
                f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})"
            )
        if self.dtype not in DTYPES:
            raise ExportError(f"unknown dtype {self.dtype!r}; choose fp32 or fp16")
        if self.quantize not in QUANTIZE:
            raise ExportError(f"unknown quantization {self.quantize!r}; the only one is int8")
        if self.dtype == "fp16" and self.quantize:
            raise ExportError("--dtype fp16 and --quantize int8 cannot be combined; pick one")


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    n_params: int
    inputs: list[str]
    outputs: list[str]
    notes: list[str] = field(default_factory=list)  # e.g. which fusions the optimizer applied


def export_onnx(
    model: GPT,
    tokenizer: Tokenizer,
    path: str | os.PathLike[str],
    *,
    options: ExportOptions | None = None,
    source: str | None = None,
) -> ExportResult:
    """Trace ``model`` into ``path`` (written atomically: a failure leaves any old file intact)."""
    options = options or ExportOptions()
    options.validate()
    path = Path(path)
    check_target(path)
    model = model.float().cpu().eval()  # dropout off; the export is always traced in fp32
    cfg = model.config
    proto = trace(model, options.opset)
    tie_embedding(proto)
    notes: list[str] = []
    if options.quantize == "int8":
        from export.variants import quantize_int8

        proto = quantize_int8(proto)
        notes.append(
            "int8: MatMul weights quantised (dynamic, per-tensor QInt8); output head stored separately"
        )
    if options.dtype == "fp16":
        from export.variants import to_fp16

        proto = to_fp16(proto)
        notes.append(
            "fp16: weights and KV cache in fp16; LayerNorm, Softmax and logits kept in fp32"
        )
    if options.optimize:
        from export.variants import optimize

        proto, fusions = optimize(proto)
        notes.append("optimize: " + (", ".join(fusions) if fusions else "no fusions applied"))

    meta = ModelMetadata(
        config=cfg.to_dict(),
        tokenizer=tokenizer,
        export={
            "logits": LOGITS_ALL,
            "opset": options.opset,
            "dtype": options.dtype,
            "quantize": options.quantize,
            "optimize": options.optimize,
            "exporter": "torch.onnx (TorchScript)",
            "gptkit_version": _gptkit_version(),
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "exported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source": source,
        },
    )
    del proto.metadata_props[:]
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    write_atomically(proto, path)
    return ExportResult(
        path=path,
        size_bytes=path.stat().st_size,
        n_params=model.num_params(),
        inputs=input_names(cfg.n_layer),
        outputs=output_names(cfg.n_layer),
        notes=notes,
    )


def trace(model: GPT, opset: int) -> onnx.ModelProto:
    """TorchScript-trace the cached forward with example sizes >= 2 and every axis dynamic."""
    cfg = model.config
    batch, seq, past = 2, 3, 4  # never 0 or 1: exporters specialise those sizes
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq)
    cache = [torch.zeros(batch, cfg.n_head, past, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    names_in, names_out = input_names(cfg.n_layer), output_names(cfg.n_layer)
    dynamic = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for name in names_in[3:]:
        dynamic[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in names_out[1:]:
        dynamic[name] = {0: "batch_size", 2: "total_sequence_length"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation notices
        torch.onnx.export(
            _CachedDecoder(model),
            (ids, mask, positions, *cache),
            buffer,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "gptkit"
    proto.producer_version = _gptkit_version()
    return proto


def tie_embedding(proto: onnx.ModelProto) -> None:
    """Store the tied embedding once: the head reads Transpose(wte) instead of a folded copy.

    Constant folding turns ``lm_head.weight`` (= wte) into a second, transposed initializer, which
    doubles the embedding's bytes in the file. Find that copy and replace it by a Transpose node.
    """
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    wte = next((i for i in graph.initializer if i.name.endswith("transformer.wte.weight")), None)
    if wte is None:
        return
    wte_array = onnx.numpy_helper.to_array(wte)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        candidate = inits[node.input[1]]
        if tuple(candidate.dims) != tuple(reversed(wte.dims)):
            continue
        if not (onnx.numpy_helper.to_array(candidate) == wte_array.T).all():
            continue
        transposed = "lm_head.weight_transposed"
        graph.initializer.remove(candidate)
        graph.node.insert(
            0,
            onnx.helper.make_node(
                "Transpose", [wte.name], [transposed], perm=[1, 0], name="lm_head/Transpose"
            ),
        )
        node.input[1] = transposed
        return


def untie_embedding(proto: onnx.ModelProto) -> None:
    """Give the head its own transposed weight (int8 wants to quantise it apart from the Gather)."""
    graph = proto.graph
    for index, node in enumerate(graph.node):
        if node.op_type == "Transpose" and node.name == "lm_head/Transpose":
            wte = next(i for i in graph.initializer if i.name == node.input[0])
            array = onnx.numpy_helper.to_array(wte).T.copy()
            graph.initializer.append(onnx.numpy_helper.from_array(array, name=node.output[0]))
            del graph.node[index]
            return


def write_atomically(proto: onnx.ModelProto, path: Path) -> None:
    """Serialise next to ``path`` and rename over it only once the file is complete."""
    if proto.ByteSize() > 2**31 - 1:
        raise ExportError(
            f"the model is {proto.ByteSize() / 2**30:.1f} GB, over ONNX's 2 GB single-file limit; "
            "models this large are not supported by gptkit export yet"
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_target(path: Path) -> None:
    if path.is_dir():
        raise ExportError(
            f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(
            f"cannot write to {parent} (permission denied); choose another output path"
        )


def _gptkit_version() -> str:
    from runtime.version import VERSION

    return VERSION
