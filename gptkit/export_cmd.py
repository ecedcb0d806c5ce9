"""`gptkit export`: a trained model to one self-contained ONNX file, parity-checked on the spot."""

from __future__ import annotations

from pathlib import Path

import click

from export.options import DTYPES, QUANTIZATIONS, SUPPORTED_OPSETS, ExportOptions
from runtime.errors import require
from runtime.files import DEFAULT_MODEL
from runtime.onnx_contract import KV_CACHE_MODES, KV_INPLACE

_DEFAULTS = ExportOptions()


@click.command("export")
@click.argument("output", default=DEFAULT_MODEL, type=click.Path())
@click.option(
    "--checkpoint",
    type=click.Path(),
    help="Run or checkpoint directory (default: runs/default, its best checkpoint).",
)
@click.option(
    "--hf",
    "hf_dir",
    type=click.Path(),
    help="A local Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer files).",
)
@click.option(
    "--opset",
    type=int,
    default=_DEFAULTS.opset,
    show_default=True,
    help=f"ONNX opset ({SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}).",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=_DEFAULTS.dtype,
    show_default=True,
    help="fp16 halves the file and the KV cache (for GPUs; LayerNorm, Softmax, logits stay fp32).",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZATIONS),
    default=_DEFAULTS.quantize,
    help="Dynamic int8 quantisation of the MatMul weights (smaller and faster on CPU).",
)
@click.option(
    "--optimize",
    is_flag=True,
    default=_DEFAULTS.optimize,
    help="Save ONNX Runtime's transformer fusions into the file (then ONNX Runtime only).",
)
@click.option(
    "--kv-cache",
    type=click.Choice(KV_CACHE_MODES),
    default=_DEFAULTS.kv_cache,
    show_default=True,
    help="inplace: attention as ONNX Runtime's GroupQueryAttention, the cache written in place "
    "(faster decoding, flat per-step cost; the file then needs ONNX Runtime).",
)
def export_command(
    output: str = DEFAULT_MODEL,
    checkpoint: str | None = None,
    hf_dir: str | None = None,
    opset: int = _DEFAULTS.opset,
    dtype: str = _DEFAULTS.dtype,
    quantize: str | None = _DEFAULTS.quantize,
    optimize: bool = _DEFAULTS.optimize,
    kv_cache: str = _DEFAULTS.kv_cache,
) -> None:
    """Export a trained model to OUTPUT (default model.onnx) with a KV cache.

    The file carries the weights, the model config and the tokenizer; `gptkit run` needs nothing
    else. Before declaring success, ONNX Runtime's logits and cache are compared with PyTorch's at
    a prompt and at cached decode steps; a model over tolerance is not written.
    """
    require("torch", extra="train", purpose="gptkit export")
    require("onnx", extra="train", purpose="gptkit export")
    from export.onnx_export import check_target, export_onnx
    from export.parity import ParityReport
    from runtime.errors import ParityError

    if checkpoint and hf_dir:
        raise click.UsageError("give either --checkpoint or --hf, not both")
    options = ExportOptions(
        opset=opset, dtype=dtype, quantize=quantize, optimize=optimize, kv_cache=kv_cache
    )
    options.validate()
    target = Path(output)
    check_target(target)  # before loading anything: a bad path should fail in a second
    model, tokenizer, source = _load(checkpoint, hf_dir)
    click.echo(f"Exporting {model.num_params() / 1e6:.2f}M parameters from {source} ...", err=True)
    try:
        result = export_onnx(model, tokenizer, target, options=options, source=source)
    except ParityError as e:  # show the figures behind the refusal, then the one-line error
        if isinstance(e.report, ParityReport):
            click.echo("\n".join(e.report.lines()))
        raise
    assert result.parity is not None  # verified: the CLI always checks parity
    click.echo("\n".join(result.parity.lines()))

    params_mb = result.n_params * 4 / 1e6
    extras = (", optimized" if optimize else "") + (
        ", in-place KV cache" if kv_cache == KV_INPLACE else ""
    )
    click.echo(
        f"Wrote {target}: {result.size_bytes / 1e6:.2f} MB ({params_mb:.2f} MB of fp32 "
        f"parameters, opset {opset}, {options.variant}{extras}) in {result.export_seconds:.1f} s"
    )
    for title, names in (("inputs", result.inputs), ("outputs", result.outputs)):
        click.echo(f"  {title}:")
        for name, shape in _abbreviate(names, result.signature):
            click.echo(f"    {name:<36} {shape}")
    for note in result.notes:
        click.echo(f"  {note}")
    _warm_load_cache(target)
    click.echo(f'Next: gptkit run --model {target} --prompt "ROMEO:"', err=True)


def _warm_load_cache(target: Path) -> None:
    """Prepare the optimised-graph cache now, so the first `gptkit run` loads fast too."""
    from runtime import graph_cache
    from runtime.session import OnnxSession

    if not graph_cache.enabled(target):
        return
    session = OnnxSession(target)
    if session.cached:
        click.echo(f"  load cache: {graph_cache.Entry(target).dir}", err=True)


def _load(checkpoint: str | None, hf_dir: str | None):
    """(model, tokenizer, source description) from a gptkit checkpoint or a Hugging Face folder."""
    if hf_dir:
        require("safetensors", extra="train", purpose="gptkit export --hf")
        from gpt_core.hf import load_hf_gpt2

        model, tokenizer = load_hf_gpt2(hf_dir)
        return model, tokenizer, f"hf:{hf_dir}"
    from gpt_core.checkpoint import load_model, resolve_checkpoint

    resolved = resolve_checkpoint(checkpoint)
    model, tokenizer = load_model(resolved)
    return model, tokenizer, str(resolved)


def _abbreviate(names: list[str], signature: dict[str, str]) -> list[tuple[str, str]]:
    """One line per plain input and one for all cache tensors (readable for 12-layer models)."""
    rows = [(n, signature.get(n, "")) for n in names if "." not in n]
    cached = [n for n in names if "." in n]
    if cached:
        stem = cached[0].rsplit(".", 2)[0]
        rows.append(
            (f"{stem}.{{0..{len(cached) // 2 - 1}}}.key|value", signature.get(cached[0], ""))
        )
    return rows
