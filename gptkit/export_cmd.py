"""`gptkit export`: a trained model to one self-contained ONNX file (or a Hugging Face or
onnxruntime-genai directory), parity-checked on the spot."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click
from click.core import ParameterSource

from export.options import DTYPES, KV_CACHE_DTYPES, QUANTIZATIONS, SUPPORTED_OPSETS, ExportOptions
from runtime.errors import require
from runtime.files import DEFAULT_MODEL
from runtime.onnx_contract import KV_CACHE_MODES, KV_INPLACE

_DEFAULTS = ExportOptions()
FORMATS = ("onnx", "hf", "genai")
DEFAULT_OUTPUTS = {"onnx": DEFAULT_MODEL, "hf": "model-hf", "genai": "model-genai"}
# Options of the ONNX graph; a Hugging Face directory holds the fp32 PyTorch weights instead.
ONNX_ONLY = {
    "opset": "--opset",
    "dtype": "--dtype",
    "quantize": "--quantize",
    "optimize": "--optimize",
    "kv_cache": "--kv-cache",
    "kv_cache_dtype": "--kv-cache-dtype",
    "kv_calibration": "--kv-calibration",
}


@click.command("export")
@click.argument("output", required=False, type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="onnx",
    show_default=True,
    help="onnx: one .onnx file for `gptkit run`. hf: a Hugging Face GPT-2 directory "
    "(transformers, vLLM, llama.cpp's converter). genai: a directory onnxruntime-genai opens.",
)
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
    help="int8: dynamic int8 MatMul weights (smaller and faster on CPU). int4: 4-bit blocks "
    "(ONNX Runtime's MatMulNBits; the tied head and embedding in 8-bit blocks, stored once): "
    "smallest and fastest on CPU, ONNX Runtime only.",
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
@click.option(
    "--kv-cache-dtype",
    type=click.Choice(KV_CACHE_DTYPES),
    default=_DEFAULTS.kv_cache_dtype,
    help="int8: with --kv-cache inplace, the cache in int8 with per-channel scales calibrated at "
    "export (a quarter of fp32's cache memory and traffic: long contexts decode faster; CPU, "
    "ONNX Runtime >= 1.27). Default: the weights' dtype.",
)
@click.option(
    "--kv-calibration",
    type=click.Path(dir_okay=False),
    default=_DEFAULTS.kv_calibration,
    help="With --kv-cache-dtype int8: calibrate the cache's scales on this UTF-8 text (e.g. the "
    "training corpus; its first 4 MiB, at least block_size tokens) instead of text the model "
    "samples itself (faster for long contexts).",
)
def export_command(
    output: str | None = None,
    checkpoint: str | None = None,
    hf_dir: str | None = None,
    fmt: str = "onnx",
    opset: int = _DEFAULTS.opset,
    dtype: str = _DEFAULTS.dtype,
    quantize: str | None = _DEFAULTS.quantize,
    optimize: bool = _DEFAULTS.optimize,
    kv_cache: str = _DEFAULTS.kv_cache,
    kv_cache_dtype: str | None = _DEFAULTS.kv_cache_dtype,
    kv_calibration: str | None = _DEFAULTS.kv_calibration,
) -> None:
    """Export a trained model to OUTPUT (default model.onnx; model-hf/ or model-genai/ for the
    directory formats).

    The .onnx file carries the weights, the model config and the tokenizer, with a KV cache;
    `gptkit run` needs nothing else. Every export is checked before it is published: ONNX
    Runtime (or transformers, for --format hf) must give PyTorch's logits, else nothing is
    written. A directory OUTPUT is replaced only when it is empty or a previous gptkit export.
    """
    require("torch", extra="train", purpose="gptkit export")
    if checkpoint and hf_dir:
        raise click.UsageError("give either --checkpoint or --hf, not both")
    target = Path(output or DEFAULT_OUTPUTS[fmt])
    options = ExportOptions(
        opset=opset,
        dtype=dtype,
        quantize=quantize,
        optimize=optimize,
        kv_cache=kv_cache,
        kv_cache_dtype=kv_cache_dtype,
        kv_calibration=kv_calibration,
    )
    if fmt == "hf":
        _check_hf_usage(target)
        _export_hf(target, checkpoint, hf_dir)
        return
    require("onnx", extra="train", purpose="gptkit export")
    options.validate()
    if fmt == "genai":
        _export_genai(target, checkpoint, hf_dir, options)
        return
    from export.onnx_export import check_target, export_onnx

    check_target(target)  # before loading anything: a bad path should fail in a second
    model, tokenizer, source = _load(checkpoint, hf_dir)
    click.echo(f"Exporting {model.num_params() / 1e6:.2f}M parameters from {source} ...", err=True)
    with _parity_figures():
        result = export_onnx(model, tokenizer, target, options=options, source=source)
    assert result.parity is not None  # verified: the CLI always checks parity
    click.echo("\n".join(result.parity.lines()))

    params_mb = result.n_params * 4 / 1e6
    extras = (", optimized" if optimize else "") + (
        ", in-place KV cache" if kv_cache == KV_INPLACE else ""
    )
    if kv_cache_dtype:
        extras += f" ({kv_cache_dtype})"
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


def _check_hf_usage(target: Path) -> None:
    """ONNX-only flags and a file-like OUTPUT are usage errors with --format hf."""
    ctx = click.get_current_context()
    given = [
        flag
        for name, flag in ONNX_ONLY.items()
        if ctx.get_parameter_source(name)
        in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    ]
    if given:
        raise click.UsageError(
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --format hf "
            "(a Hugging Face directory holds the fp32 PyTorch weights); leave "
            f"{'it' if len(given) == 1 else 'them'} out"
        )
    if target.suffix == ".onnx" and not target.is_dir():
        raise click.UsageError(
            f"--format hf writes a directory, not {target}; give a directory name "
            f"(default {DEFAULT_OUTPUTS['hf']})"
        )


def _export_hf(target: Path, checkpoint: str | None, hf_dir: str | None) -> None:
    require("safetensors", extra="train", purpose="gptkit export --format hf")
    require("tokenizers", extra="train", purpose="gptkit export --format hf")
    from export.hf_export import check_target, export_hf

    check_target(target)  # before loading anything
    model, tokenizer, source = _load(checkpoint, hf_dir)
    click.echo(f"Exporting {model.num_params() / 1e6:.2f}M parameters from {source} ...", err=True)
    result = export_hf(model, tokenizer, target, source=source)
    click.echo(result.parity_line())
    _print_files(target, result.files, result.export_seconds)
    for note in result.notes:
        click.echo(f"  {note}")
    click.echo(
        f'Next: python -c "from transformers import pipeline; '
        f"print(pipeline('text-generation', '{target}')('ROMEO:')[0]['generated_text'])\"",
        err=True,
    )


def _export_genai(
    target: Path, checkpoint: str | None, hf_dir: str | None, options: ExportOptions
) -> None:
    from export.genai_export import check_target, export_genai

    check_target(target)  # before loading anything
    model, tokenizer, source = _load(checkpoint, hf_dir)
    click.echo(f"Exporting {model.num_params() / 1e6:.2f}M parameters from {source} ...", err=True)
    with _parity_figures():
        result = export_genai(model, tokenizer, target, options=options, source=source)
    if result.parity is not None:
        click.echo("\n".join(result.parity.lines()))
    path = Path(result.path)
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    _print_files(path, files, None)
    for note in result.notes:
        click.echo(f"  {note}")
    click.echo(f"Next: gptkit inspect {path}", err=True)


def _print_files(directory: Path, files: dict[str, int], seconds: float | None) -> None:
    total = sum(files.values())
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    click.echo(
        f"Wrote {str(directory).rstrip('/')}/: {len(files)} files, {total / 1e6:.2f} MB{took}"
    )
    for name, size in files.items():
        shown = f"{size / 1e6:.2f} MB" if size >= 100_000 else f"{size / 1e3:.1f} KB"
        click.echo(f"  {name:<28} {shown:>10}")


@contextlib.contextmanager
def _parity_figures() -> Iterator[None]:
    """On a parity refusal, show the figures behind it, then let the one-line error through."""
    from export.parity import ParityReport
    from runtime.errors import ParityError

    try:
        yield
    except ParityError as e:
        if isinstance(e.report, ParityReport):
            click.echo("\n".join(e.report.lines()))
        raise


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
