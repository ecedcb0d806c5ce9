"""`gptkit inspect`: what an exported model carries (no PyTorch needed)."""

from __future__ import annotations

import json

import click

from runtime.errors import require


@click.command("inspect")
@click.argument("model", default="model.onnx", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def inspect_command(model: str = "model.onnx", as_json: bool = False) -> None:
    """Show MODEL's config, tokenizer, export details, inputs and outputs."""
    require("onnxruntime", extra=None, purpose="gptkit inspect")
    from runtime.session import OnnxSession

    session = OnnxSession(model, optimization="none")
    meta = session.metadata
    inputs = [(i.name, i.type, i.shape) for i in session.session.get_inputs()]
    outputs = [(o.name, o.type, o.shape) for o in session.session.get_outputs()]
    tok = meta.tokenizer
    if as_json:
        doc = {
            "config": meta.config,
            "tokenizer": {
                "name": tok.name,
                "n_vocab": tok.n_vocab,
                "special_tokens": tok.special_tokens,
            },
            "export": meta.export,
            "inputs": [{"name": n, "type": t, "shape": s} for n, t, s in inputs],
            "outputs": [{"name": n, "type": t, "shape": s} for n, t, s in outputs],
        }
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{model}")
    click.echo("config:    " + ", ".join(f"{k}={v}" for k, v in meta.config.items()))
    specials = ", ".join(f"{k}={v}" for k, v in tok.special_tokens.items())
    click.echo(f"tokenizer: {tok.name}, {tok.n_vocab} ids (special: {specials})")
    click.echo("export:    " + ", ".join(f"{k}={v}" for k, v in meta.export.items()))
    click.echo("inputs:")
    for name, type_, shape in inputs:
        click.echo(f"  {name:<28} {type_:<16} {shape}")
    click.echo("outputs:")
    for name, type_, shape in outputs:
        click.echo(f"  {name:<28} {type_:<16} {shape}")
