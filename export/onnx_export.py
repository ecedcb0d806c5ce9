"""Export a GPT with its KV cache to one self-contained ONNX file, verified before it is written.

The graph is the model's own cache-aware forward (``GPT.forward``), traced once, with the inputs
and outputs of :mod:`runtime.onnx_contract`: one graph serves the prompt (a past of length 0) and
every cached step. The file carries the model config, the tokenizer and export details in its
metadata (:mod:`runtime.metadata`), so it is the only thing the runtime needs.

:func:`export_onnx` stages the file next to its target, compares ONNX Runtime with PyTorch on it
(:mod:`export.parity`), and only then renames it into place: a file that fails parity never
replaces a good one, and a crash leaves at most a hidden temp file.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export, then ONNX Script), with the
contract's dynamic axes as ``dynamic_shapes``; the in-place variant's fused attention is a custom
op with its own ONNX translation (``export.inplace_cache``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.helper
import torch

from export.graph_edits import (
    sort_topologically,
    split_head,
    strip_exporter_extras,
    tie_embedding,
)
from export.inplace_cache import (
    GQA_OP,
    TRANSLATION,
    FusedAttention,
    calibration_ids,
    kv_cache_scales,
    quantize_kv_cache,
    read_calibration_text,
)
from export.options import ExportOptions
from export.parity import ParityReport, verify_parity
from export.variants import optimize, quantize_int4, quantize_int8, to_fp16
from gpt_core.model import GPT, attention_kernel, fp32_cpu
from runtime.errors import ExportError, ParityError
from runtime.files import atomic_write_bytes
from runtime.metadata import ModelMetadata
from runtime.onnx_contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    IO_NAMING,
    KV_INPLACE,
    LOGITS_ALL,
    POSITION_IDS,
    TOTAL_AXIS,
    dynamic_axes,
    input_names,
    output_names,
    past_names,
)
from runtime.tokenizer import Tokenizer
from runtime.version import VERSION

MAX_PROTO_BYTES = 2**31 - 1  # protobuf's hard limit for one serialised message


class FlatCacheForward(torch.nn.Module):
    """``GPT.forward`` with the cache as flat positional tensors: the ONNX graph's signature."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        pairs = tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2))
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=pairs,
        )
        assert out.past_key_values is not None  # a cached call always returns its cache
        flat = [t for pair in out.past_key_values for t in pair]
        return (out.logits, *flat)


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
    parity: ParityReport | None = None  # None when exported with verify=False


def export_onnx(
    model: GPT,
    tokenizer: Tokenizer,
    path: str | os.PathLike[str],
    *,
    options: ExportOptions | None = None,
    source: str | None = None,
    verify: bool = True,
) -> ExportResult:
    """Export ``model`` to ``path``: stage, verify parity with PyTorch, then publish atomically.

    verify: compare ONNX Runtime with PyTorch at a left-padded prompt and cached steps before the
        file is renamed into place; over tolerance raises ParityError (carrying the report as
        ``.report``) and ``path`` is left as it was. ``verify=False`` skips the comparison.
    The caller's model is not modified (a non-fp32 or non-CPU model is copied first, and the
    training/eval mode is restored afterwards).
    """
    start = time.perf_counter()
    options = options or ExportOptions()
    options.validate()
    target = Path(path)
    check_target(target)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer.n_vocab} ids but the model only "
            f"{model.config.vocab_size}; they do not belong together"
        )
    calibration = None
    if options.kv_calibration:  # before any tracing: a bad file fails in a second
        text = read_calibration_text(Path(options.kv_calibration))
        calibration = tokenizer.encode(text, allow_special=True)
    proto, notes, fusions, details = build_graph(model, options, calibration_text=calibration)
    _write_metadata(proto, model, tokenizer, options, fusions, source, details)
    with _staging_file(target) as staging:
        write_model(proto, staging)
        report = None
        if verify:
            report = verify_parity(model, staging, variant=options.variant, raise_on_failure=False)
            if not report.ok:
                failures = "; ".join(report.failures)
                raise ParityError(f"parity check failed, {target} not written: {failures}", report)
        os.replace(staging, target)
    cfg = model.config
    return ExportResult(
        path=target,
        size_bytes=target.stat().st_size,
        n_params=model.num_params(),
        inputs=input_names(cfg.n_layer),
        outputs=output_names(cfg.n_layer),
        export_seconds=time.perf_counter() - start,
        notes=notes,
        fusions=fusions,
        signature=signature(proto),
        parity=report,
    )


def build_graph(
    model: GPT, options: ExportOptions, *, calibration_text: list[int] | None = None
) -> tuple[onnx.ModelProto, list[str], dict[str, int], dict]:
    """The traced graph with its variant applied: (graph, notes for the user, fusions done,
    quantisation details for the metadata). ``calibration_text``: the token ids of
    ``options.kv_calibration`` (the int8 KV cache's scales come from them, not from sampling)."""
    cfg = model.config
    proto = trace(model, options.opset, kv_cache=options.kv_cache)
    tie_embedding(proto)
    notes: list[str] = []
    fusions: dict[str, int] = {}
    details: dict = {}
    if options.optimize:  # before fp16/int8: the fusion patterns are written for fp32 graphs
        proto, fusions = optimize(proto, cfg.n_head, cfg.n_embd)
        found = ", ".join(f"{op} x{n}" for op, n in fusions.items())
        notes.append(f"optimize: fused {found or 'nothing'}")
    if options.quantize == "int8":
        proto, tied = quantize_int8(proto)
        embedding = (
            "the token lookup reads the head's int8 weight (embedding stored once)"
            if tied
            else "the embedding lookup keeps its fp32 table"
        )
        notes.append(f"int8: MatMul weights quantised (dynamic QInt8); {embedding}")
    elif options.quantize == "int4":
        proto, int4 = quantize_int4(proto)
        details["int4"] = int4
        split_head(proto)  # a head left fp32 (n_embd not a multiple of 16) stays tied
        sort_topologically(proto.graph)
        notes.append(
            f"int4: {int4['matmuls']} MatMul weights in 4-bit blocks of "
            f"{'/'.join(map(str, int4['block_sizes'])) or '-'} (MatMulNBits, "
            f"{'symmetric' if int4['symmetric'] else 'asymmetric'}, accuracy_level "
            f"{int4['accuracy_level']}); output head {int4['head']}"
        )
    elif options.dtype == "fp16":
        proto = to_fp16(proto)
        tie_embedding(proto)  # the converter may fold the head's Transpose into a second copy
        notes.append("fp16: weights and KV cache fp16; LayerNorm, Softmax and logits fp32")
    else:
        split_head(proto)  # fp32: a quarter of the load-time memory peak the head costs
    if options.kv_cache_dtype == "int8":
        reference = fp32_cpu(model)
        was_training = reference.training
        reference.eval()
        try:
            ids = calibration_ids(reference, text_ids=calibration_text)
            proto = quantize_kv_cache(proto, kv_cache_scales(reference, ids))
        finally:
            reference.train(was_training)
        if calibration_text is None:
            source = "text the model sampled itself"
            details["kv_calibration"] = {"text": "sampled by the model", "rows": len(ids)}
        else:
            name = Path(options.kv_calibration or "").name
            source = f"{len(ids) - 1} window(s) of {name}"
            details["kv_calibration"] = {"text": name, "rows": len(ids)}
        notes.append(
            f"int8 KV cache: per-channel scales from {ids.shape[0]} x {ids.shape[1]} calibration "
            f"tokens (random ids, and {source})"
        )
    return proto, notes, fusions, details


def trace(model: GPT, opset: int, *, kv_cache: str) -> onnx.ModelProto:
    """Export the cached forward of an fp32 eval-mode copy with the dynamo exporter.

    Every axis is dynamic (named as in :mod:`runtime.onnx_contract`); the exporter captures with
    size-oblivious shapes, so a past of length 0 or a batch of 1 are not frozen into the graph
    (the tests run the graph at past 0 and 1, seq 1 and batch 1 and 3). ``kv_cache="inplace"``
    exports the same forward with attention as ONNX Runtime's fused op.
    """
    cfg = model.config
    traced = fp32_cpu(model)
    was_training = traced.training
    traced.eval()  # dropout off; the mode is restored below (the caller's model may be training)
    batch, seq, past = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = (torch.arange(past, past + seq) % cfg.block_size).expand(batch, seq)
    cache = [torch.zeros(batch, cfg.n_head, past, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    axes = dynamic_axes(cfg.n_layer)
    shapes = {
        "input_ids": axes[INPUT_IDS],
        "attention_mask": axes[ATTENTION_MASK],
        "position_ids": axes[POSITION_IDS],
        "past": tuple(axes[name] for name in past_names(cfg.n_layer)),
    }  # keyed by FlatCacheForward.forward's parameters
    inplace = kv_cache == KV_INPLACE
    kernel = attention_kernel(traced, FusedAttention()) if inplace else contextlib.nullcontext()
    try:
        with _quiet_exporter(), torch.no_grad(), kernel:
            program = torch.onnx.export(
                FlatCacheForward(traced).eval(),
                (ids, mask, positions, *cache),
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=input_names(cfg.n_layer),
                output_names=output_names(cfg.n_layer),
                opset_version=opset,
                custom_translation_table=TRANSLATION if inplace else None,
                verbose=False,
            )
    except Exception as e:  # torch.export and onnxscript raise many types; all mean "failed"
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {reason}") from None
    finally:
        traced.train(was_training)
    if program is None:  # only without dynamo; keeps the type checker honest
        raise ExportError("torch.onnx.export returned no program")
    # The present axis comes out as the expression past + sequence: give it the contract's name.
    expressions = {
        str(dim)
        for value in program.model.graph.outputs
        if value.shape is not None
        for dim in value.shape.dims
        if not isinstance(dim, int) and "+" in str(dim)
    }
    program.rename_axes({expression: TOTAL_AXIS for expression in expressions})
    proto = program.model_proto
    strip_exporter_extras(proto)
    # The lowest IR version the opsets allow, so older ONNX Runtimes and tools load the file.
    proto.ir_version = onnx.helper.find_min_ir_version_for(
        list(proto.opset_import), ignore_unknown=True
    )
    if inplace and sum(n.op_type == GQA_OP for n in proto.graph.node) != cfg.n_layer:
        raise ExportError("the fused-attention export did not produce one attention op per layer")
    proto.producer_name = "gptkit"
    proto.producer_version = VERSION
    return proto


def signature(proto: onnx.ModelProto) -> dict[str, str]:
    """Every graph input and output as ``name -> "dtype [dim, ...]"`` (symbolic dims by name)."""
    out = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        dims = [d.dim_param or str(d.dim_value) for d in tensor.shape.dim]
        out[value.name] = f"{dtype} [{', '.join(dims)}]"
    return out


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


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's progress lines and known-harmless warnings off the user's screen."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # "The axis name: batch_size will not be used, since it shares the same shape
        # constraints with another axis": every input repeats batch_size, on purpose.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares")
        warnings.simplefilter("ignore", FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


@contextlib.contextmanager
def _staging_file(target: Path):
    """A hidden temp file beside ``target`` (same file system, so the final rename is atomic)."""
    try:  # os.access in check_target can say yes where writing fails (root, read-only mounts)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise ExportError(f"cannot write to {target.parent}: {e.strerror or e}") from None
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
    finally:
        staging.unlink(missing_ok=True)


def _write_metadata(
    proto: onnx.ModelProto,
    model: GPT,
    tokenizer: Tokenizer,
    options: ExportOptions,
    fusions: dict[str, int],
    source: str | None,
    details: dict | None = None,
) -> None:
    meta = ModelMetadata(
        config=model.config.to_dict(),
        tokenizer=tokenizer,
        export={
            "format": "onnx",
            "io": IO_NAMING,
            "logits": LOGITS_ALL,
            "opset": options.opset,
            "dtype": options.dtype,
            "kv_dtype": options.kv_cache_dtype or options.dtype,
            "quantize": options.quantize,
            "optimize": options.optimize,
            "fusions": fusions,
            "kv_cache": options.kv_cache,
            "exporter": "torch.onnx.export(dynamo=True)",
            "n_params": model.num_params(),
            "gptkit_version": VERSION,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "exported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source": source,
            **(details or {}),
        },
    )
    del proto.metadata_props[:]
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
