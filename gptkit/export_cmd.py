"""`gptkit export`: a trained model to one self-contained ONNX file, parity-checked on the spot."""

from __future__ import annotations

from pathlib import Path

import click

from runtime.errors import require


@click.command("export")
@click.argument("output", default="model.onnx", type=click.Path())
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
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (14-20).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    help="Dynamic int8 quantisation of the MatMul weights.",
)
@click.option(
    "--optimize",
    is_flag=True,
    help="Apply ONNX Runtime graph optimisations (runtime-specific ops).",
)
def export_command(
    output: str = "model.onnx",
    checkpoint: str | None = None,
    hf_dir: str | None = None,
    opset: int = 17,
    dtype: str = "fp32",
    quantize: str | None = None,
    optimize: bool = False,
) -> None:
    """Export a trained model to OUTPUT (default model.onnx) with a KV cache.

    The file carries the weights, the model config and the tokenizer; `gptkit run` needs nothing
    else. Before declaring success, ONNX Runtime's logits and cache are compared with PyTorch's at
    the prompt and at cached decode steps.
    """
    require("torch", extra="train", purpose="gptkit export")
    require("onnx", extra="train", purpose="gptkit export")
    from export.onnx_export import ExportOptions, check_target, export_onnx
    from export.parity import verify_parity

    if checkpoint and hf_dir:
        raise click.UsageError("give either --checkpoint or --hf, not both")
    options = ExportOptions(opset=opset, dtype=dtype, quantize=quantize, optimize=optimize)
    options.validate()
    check_target(Path(output))
    if hf_dir:
        from gpt_core.hf import load_hf_gpt2

        model, tokenizer = load_hf_gpt2(hf_dir)
        source = f"hf:{hf_dir}"
    else:
        from gpt_core.checkpoint import load_model, resolve_checkpoint

        source = str(resolve_checkpoint(checkpoint))
        model, tokenizer = load_model(source)
    click.echo(f"Exporting {model.num_params() / 1e6:.2f}M parameters from {source} ...", err=True)
    variant = "int8" if quantize else dtype
    # Export next to the target, verify, and only then move it into place: a model that fails
    # its parity check never replaces a good file.
    target = Path(output)
    staging = target.with_name(f".{target.name}.unverified")
    try:
        result = export_onnx(model, tokenizer, staging, options=options, source=source)
        report = verify_parity(model, staging, variant=variant, raise_on_failure=False)
        for line in report.lines():
            click.echo(line, err=True)
        if not report.ok:
            raise click.ClickException(
                "parity check failed, nothing written: " + "; ".join(report.failures)
            )
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)
    size_mb = result.size_bytes / 1e6
    click.echo(
        f"Wrote {target} ({size_mb:.1f} MB; {result.n_params * 4 / 1e6:.1f} MB of fp32 parameters)",
        err=True,
    )
    click.echo(f"  inputs:  {', '.join(_abbreviate(result.inputs))}", err=True)
    click.echo(f"  outputs: {', '.join(_abbreviate(result.outputs))}", err=True)
    for note in result.notes:
        click.echo(f"  {note}", err=True)
    click.echo(f'Next: gptkit run --model {target} --prompt "ROMEO:"', err=True)


def _abbreviate(names: list[str]) -> list[str]:
    """input_ids, ..., past_key_values.{0..11}.key|value: readable for 12-layer models."""
    plain = [n for n in names if "." not in n]
    cached = [n for n in names if "." in n]
    if cached:
        layers = len(cached) // 2
        stem = cached[0].split(".")[0]
        plain.append(f"{stem}.{{0..{layers - 1}}}.key|value")
    return plain
