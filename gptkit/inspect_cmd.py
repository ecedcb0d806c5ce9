"""`gptkit inspect`: what an exported model carries (no PyTorch needed)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from runtime.errors import require

# The config fields worth reading first; any others follow in file order.
_CONFIG_ORDER = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


@click.command("inspect")
@click.argument("model", default="model.onnx", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON document.")
def inspect_command(model: str = "model.onnx", as_json: bool = False) -> None:
    """Show MODEL's config, tokenizer, export details, inputs and outputs.

    Reads the metadata gptkit export embedded in the file; a file without it is refused with
    a one-line message. Needs only onnxruntime (no PyTorch).
    """
    require("onnxruntime", extra=None, purpose="gptkit inspect")
    from runtime.session import OnnxSession

    session = OnnxSession(model, optimization="none")
    meta = session.metadata
    inputs = [(i.name, _dtype(i.type), i.shape) for i in session.session.get_inputs()]
    outputs = [(o.name, _dtype(o.type), o.shape) for o in session.session.get_outputs()]
    tok = meta.tokenizer
    size = Path(model).stat().st_size
    if as_json:
        doc = {
            "path": model,
            "size_bytes": size,
            "config": meta.config,
            "tokenizer": {
                "name": tok.name,
                "n_vocab": tok.n_vocab,
                "special_tokens": tok.special_tokens,
                "pattern": tok.pattern,
            },
            "export": meta.export,
            "inputs": [{"name": n, "type": t, "shape": s} for n, t, s in inputs],
            "outputs": [{"name": n, "type": t, "shape": s} for n, t, s in outputs],
        }
        click.echo(json.dumps(doc, indent=2))
        return

    config = dict(meta.config)
    ordered = {k: config.pop(k) for k in _CONFIG_ORDER if k in config} | config
    click.echo(f"{model}: {size / 1e6:.2f} MB")
    click.echo("config:    " + ", ".join(f"{k}={v}" for k, v in ordered.items()))
    specials = ", ".join(f"{k}={v}" for k, v in tok.special_tokens.items()) or "none"
    click.echo(f"tokenizer: {tok.name}, {tok.n_vocab} ids (special: {specials})")
    click.echo("export:")
    for key, value in meta.export.items():
        click.echo(f"  {key:<15} {_plain(value)}")
    for title, rows in (("inputs", inputs), ("outputs", outputs)):
        click.echo(f"{title}:")
        for name, dtype, shape in rows:
            dims = ", ".join(str(d) for d in shape)
            click.echo(f"  {name:<28} {dtype:<8} [{dims}]")


def _dtype(ort_type: str) -> str:
    """``tensor(float)`` -> ``float32``: the numpy names the rest of gptkit prints."""
    inner = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(inner, inner)


def _plain(value) -> str:
    if isinstance(value, dict):
        return (
            ", ".join(f"{k} x{v}" if isinstance(v, int) else f"{k}={v}" for k, v in value.items())
            or "-"
        )
    return "-" if value is None else str(value)
