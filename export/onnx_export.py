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

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. It keeps every axis
dynamic from one trace at example sizes >= 2, which ``torch.export`` does not guarantee for KV-cache
decoders (it specialises sizes 0 and 1; see docs/ANCHORS pitfalls 3 and 11). Any TracerWarning is
an error here: it means a shape was frozen into the graph.
"""

from __future__ import annotations

import copy
import datetime as _dt
import io
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import torch

from gpt_core.model import GPT
from runtime.errors import ExportError
from runtime.metadata import LOGITS_ALL, ModelMetadata
from runtime.tokenizer import Tokenizer, atomic_write_bytes

DEFAULT_OPSET = 17  # first opset with LayerNormalization; what ORT's transformer fusions know best
SUPPORTED_OPSETS = range(14, 21)  # 14: first with SDPA's ops; 20: the TorchScript exporter's last
DTYPES = ("fp32", "fp16")
QUANTIZE = (None, "int8")
KV_CACHES = ("concat", "inplace")  # standard ONNX, or ORT's fused attention writing in place
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's hard limit for one serialised message
HEAD_TRANSPOSE = "lm_head/Transpose"  # the node through which the output head reads wte
HEAD_PARTS = 4  # vocabulary slices of the fp32 output head (see split_head)


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


class CachedDecoder(torch.nn.Module):
    """The GPT with flat cache inputs and outputs: what the ONNX graph's signature looks like."""

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
    kv_cache: str = "concat"

    @property
    def variant(self) -> str:
        """The name parity tolerances are keyed by: fp32, fp16 or int8."""
        return self.quantize or self.dtype

    def validate(self) -> None:
        """Reject unsupported values and combinations before any work is done."""
        if self.opset not in SUPPORTED_OPSETS:
            raise ExportError(
                f"opset {self.opset} is not supported; use one of "
                f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})"
            )
        if self.dtype not in DTYPES:
            raise ExportError(f"unknown dtype {self.dtype!r}; choose fp32 or fp16")
        if self.quantize not in QUANTIZE:
            raise ExportError(f"unknown quantization {self.quantize!r}; the only one is int8")
        if self.kv_cache not in KV_CACHES:
            raise ExportError(f"unknown KV cache {self.kv_cache!r}; choose concat or inplace")
        if self.dtype == "fp16" and self.quantize:
            raise ExportError(
                "--dtype fp16 and --quantize int8 cannot be combined; int8 keeps fp32 "
                "activations, so pick one"
            )


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    n_params: int
    inputs: list[str]
    outputs: list[str]
    export_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # e.g. which fusions the optimizer applied
    fusions: dict[str, int] = field(default_factory=dict)  # fused op type -> count (--optimize)
    signature: dict[str, str] = field(default_factory=dict)  # name -> "int64 [batch_size, ...]"


def export_onnx(
    model: GPT,
    tokenizer: Tokenizer,
    path: str | os.PathLike[str],
    *,
    options: ExportOptions | None = None,
    source: str | None = None,
) -> ExportResult:
    """Export ``model`` to ``path``, written atomically: a failure leaves any old file intact.

    The caller's model is not modified (a non-fp32 or non-CPU model is copied first, and the
    training/eval mode is restored afterwards).
    """
    start = time.perf_counter()
    options = options or ExportOptions()
    options.validate()
    path = Path(path)
    check_target(path)
    cfg = model.config
    if tokenizer.n_vocab > cfg.vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer.n_vocab} ids but the model only {cfg.vocab_size}; "
            "they do not belong together"
        )
    proto = trace(model, options.opset, kv_cache=options.kv_cache)
    tie_embedding(proto)
    notes: list[str] = []
    fusions: dict[str, int] = {}
    if options.optimize:  # before fp16/int8: the fusion patterns are written for fp32 graphs
        from export.variants import optimize

        proto, fusions = optimize(proto, cfg.n_head, cfg.n_embd)
        found = ", ".join(f"{op} x{n}" for op, n in fusions.items())
        notes.append(f"optimize: fused {found or 'nothing'}")
    if options.quantize == "int8":
        from export.variants import quantize_int8

        proto = quantize_int8(proto)
        notes.append(
            "int8: MatMul weights quantised (dynamic QInt8); output head stored apart from wte"
        )
    elif options.dtype == "fp16":
        from export.variants import to_fp16

        proto = to_fp16(proto)
        tie_embedding(proto)  # the converter may fold the head's Transpose into a second copy
        notes.append("fp16: weights and KV cache fp16; LayerNorm, Softmax and logits fp32")
    else:
        split_head(proto)  # fp32: a quarter of the load-time memory peak the head costs

    meta = ModelMetadata(
        config=cfg.to_dict(),
        tokenizer=tokenizer,
        export={
            "format": "onnx",
            "io": "optimum-decoder",  # names as Optimum / onnxruntime-genai type "decoder"
            "logits": LOGITS_ALL,
            "opset": options.opset,
            "dtype": options.dtype,
            "kv_dtype": options.dtype,
            "quantize": options.quantize,
            "optimize": options.optimize,
            "fusions": fusions,
            "kv_cache": options.kv_cache,
            "exporter": "torch.onnx.export(dynamo=False)",
            "n_params": model.num_params(),
            "gptkit_version": _gptkit_version(),
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.10)
            "source": source,
        },
    )
    del proto.metadata_props[:]
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    write_model(proto, path)
    return ExportResult(
        path=path,
        size_bytes=path.stat().st_size,
        n_params=model.num_params(),
        inputs=input_names(cfg.n_layer),
        outputs=output_names(cfg.n_layer),
        export_seconds=time.perf_counter() - start,
        notes=notes,
        fusions=fusions,
        signature=signature(proto),
    )


def signature(proto: onnx.ModelProto) -> dict[str, str]:
    """Every graph input and output as ``name -> "dtype [dim, ...]"`` (symbolic dims by name)."""
    out = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        dims = [d.dim_param or str(d.dim_value) for d in tensor.shape.dim]
        out[value.name] = f"{dtype} [{', '.join(dims)}]"
    return out


def trace(model: GPT, opset: int, *, kv_cache: str = "concat") -> onnx.ModelProto:
    """Trace the cached forward of an fp32 eval-mode copy, with every axis dynamic.

    Example sizes are >= 2 (batch 2, seq 3, past 4), never 0 or 1: exporters treat those as
    constants. The exported graph is tested at past 0 and 1 and seq 1 afterwards.
    ``kv_cache="inplace"`` traces the fused-attention wrapper of ``export.inplace_cache``.
    """
    from export.inplace_cache import InplaceCachedDecoder, place_gqa_inputs

    wrapper = InplaceCachedDecoder if kv_cache == "inplace" else CachedDecoder
    cfg = model.config
    traced = _fp32_cpu(model)
    was_training = traced.training
    traced.eval()  # dropout off; the mode is restored below (the caller's model may be training)
    batch, seq, past = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = (torch.arange(past, past + seq) % cfg.block_size).expand(batch, seq)
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
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript exporter"
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("error", torch.jit.TracerWarning)  # a frozen shape: fail loudly
            torch.onnx.export(
                wrapper(traced).eval(),  # the exporter restores this wrapper's mode
                (ids, mask, positions, *cache),
                buffer,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
                custom_opsets={"com.microsoft": 1} if kv_cache == "inplace" else None,
                dynamo=False,
            )
    except torch.jit.TracerWarning as e:
        raise ExportError(f"tracing froze a dynamic value into the graph: {e}") from None
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {reason}") from None
    finally:
        traced.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    if kv_cache == "inplace" and place_gqa_inputs(proto.graph) != cfg.n_layer:
        raise ExportError("the fused-attention trace did not produce one attention op per layer")
    proto.producer_name = "gptkit"
    proto.producer_version = _gptkit_version()
    return proto


def tie_embedding(proto: onnx.ModelProto) -> bool:
    """Store the tied embedding once: the head reads Transpose(wte) instead of a folded copy.

    Constant folding turns ``lm_head.weight`` (= wte) into a second, transposed initializer, which
    doubles the embedding's bytes in the file. Find that copy and replace it by a Transpose node.
    Returns whether a copy was found. ONNX Runtime folds the Transpose again in memory at load
    (in slices, for fp32 files: see split_head).
    """
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    wte = next((i for i in graph.initializer if i.name.endswith("transformer.wte.weight")), None)
    if wte is None:
        return False
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
                "Transpose", [wte.name], [transposed], perm=[1, 0], name=HEAD_TRANSPOSE
            ),
        )
        node.input[1] = transposed
        return True
    return False


def split_head(proto: onnx.ModelProto, parts: int = HEAD_PARTS) -> bool:
    """Compute the tied output head in ``parts`` vocabulary slices: MatMul(x, Transpose(Slice(wte))).

    ONNX Runtime constant-folds each Transpose(Slice(wte)) into its own initializer and prepacks
    it for the MatMul, after which the folded copy is released. With one [C, V] head that copy
    is 154 MB (gpt2) held next to its packed form while it is packed: the load's peak memory.
    Slices make that transient 1 / parts as large; the logits Concat costs ~0.2 MB a step. The
    file still stores wte once. Returns whether the head was found (fp32 graphs).
    """
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    graph = proto.graph
    transpose = next((n for n in graph.node if n.name == HEAD_TRANSPOSE), None)
    if transpose is None:
        return False
    head = next(
        (n for n in graph.node if n.op_type == "MatMul" and transpose.output[0] in n.input), None
    )
    wte = next((i for i in graph.initializer if i.name == transpose.input[0]), None)
    if head is None or wte is None:
        return False
    bounds = np.linspace(0, wte.dims[0], parts + 1).astype(np.int64)
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "lm_head/slice_axes")
    graph.initializer.append(axes)
    new_nodes, pieces = [], []
    for k in range(parts):
        prefix = f"lm_head/part{k}"
        for which, value in (("start", bounds[k]), ("end", bounds[k + 1])):
            graph.initializer.append(
                numpy_helper.from_array(np.array([value], dtype=np.int64), f"{prefix}/{which}")
            )
        new_nodes += [
            helper.make_node(
                "Slice",
                [wte.name, f"{prefix}/start", f"{prefix}/end", axes.name],
                [f"{prefix}/rows"],
                name=f"{prefix}/Slice",
            ),
            helper.make_node(
                "Transpose",
                [f"{prefix}/rows"],
                [f"{prefix}/weight"],
                perm=[1, 0],
                name=f"{prefix}/Transpose",
            ),
            helper.make_node(
                "MatMul",
                [head.input[0], f"{prefix}/weight"],
                [f"{prefix}/logits"],
                name=f"{prefix}/MatMul",
            ),
        ]
        pieces.append(f"{prefix}/logits")
    new_nodes.append(
        helper.make_node("Concat", pieces, list(head.output), axis=-1, name="lm_head/Concat")
    )
    index = list(graph.node).index(head)
    graph.node.remove(head)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(index + offset, node)
    graph.node.remove(transpose)
    return True


def untie_embedding(proto: onnx.ModelProto) -> None:
    """Give the head its own transposed weight (int8 quantises it apart from the Gather)."""
    graph = proto.graph
    for index, node in enumerate(graph.node):
        if node.op_type == "Transpose" and node.name == HEAD_TRANSPOSE:
            wte = next(i for i in graph.initializer if i.name == node.input[0])
            array = onnx.numpy_helper.to_array(wte).T.copy()
            graph.initializer.append(onnx.numpy_helper.from_array(array, name=node.output[0]))
            del graph.node[index]
            return


def write_model(proto: onnx.ModelProto, path: Path) -> None:
    """Check the graph, then write it through a temp file renamed over ``path`` when complete."""
    size = proto.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise ExportError(
            f"the model is {size / 2**30:.1f} GB, over ONNX's 2 GB single-file limit; "
            "models this large are not supported by gptkit export yet"
        )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ExportError(
            f"the exported graph is not valid ONNX: {str(e).splitlines()[0]}"
        ) from None
    try:
        atomic_write_bytes(path, proto.SerializeToString())
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None


def check_target(path: Path) -> None:
    """Fail early, before any tracing, when ``path`` cannot become the output file."""
    if path.is_dir():
        raise ExportError(
            f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}"
        )
    parent = path.parent
    if not parent.is_dir():
        raise ExportError(f"directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(
            f"cannot write to {parent} (permission denied); choose another output path"
        )


def _fp32_cpu(model: GPT) -> GPT:
    """``model`` itself when it is already fp32 on the CPU, else an fp32 CPU copy."""
    param = next(model.parameters())
    if param.dtype == torch.float32 and param.device.type == "cpu":
        return model
    return copy.deepcopy(model).float().cpu()


def _gptkit_version() -> str:
    from runtime.version import VERSION

    return VERSION
