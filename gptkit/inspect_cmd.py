"""`gptkit inspect`: what an exported model carries (no PyTorch needed).

A ``.onnx`` file shows its embedded metadata and I/O; a directory export shows its format's own
files: a Hugging Face folder its config.json, tokenizer and safetensors header (read as JSON, so
no tokenizers or safetensors package is needed), an onnxruntime-genai folder its genai_config.json
and then the inner ``.onnx`` as for a file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import click

from runtime.errors import ModelFileError, require

# The config fields worth reading first; any others follow in file order.
_CONFIG_ORDER = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
_HF_ORDER = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "activation_function")
_MAX_HEADER = 100_000_000  # a safetensors header larger than this is a corrupt file


@click.command("inspect")
@click.argument("model", default="model.onnx", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON document.")
def inspect_command(model: str = "model.onnx", as_json: bool = False) -> None:
    """Show what MODEL carries: a .onnx file, or a directory from `gptkit export --format hf`
    or `--format genai`.

    For a file: the config, tokenizer, export details, inputs and outputs gptkit embedded (a file
    without them is refused with a one-line message). Needs only onnxruntime (no PyTorch).
    """
    path = Path(model)
    if path.is_dir():
        if (path / "genai_config.json").is_file():
            doc = _genai_doc(path)
        elif (path / "config.json").is_file():
            doc = _hf_doc(path)
        else:
            raise ModelFileError(
                f"{path} is a directory with neither config.json (Hugging Face) nor "
                "genai_config.json (onnxruntime-genai); give a gptkit export"
            )
    else:
        doc = _onnx_doc(model)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif doc["format"] == "hf":
        _print_hf(doc)
    elif doc["format"] == "genai":
        _print_genai(doc)
    else:
        _print_onnx(doc)


# ---- .onnx files --------------------------------------------------------------------------------


def _onnx_doc(model: str) -> dict[str, Any]:
    require("onnxruntime", extra=None, purpose="gptkit inspect")
    from runtime.session import OnnxSession

    session = OnnxSession(model, optimization="none")
    meta = session.metadata
    tok = meta.tokenizer
    return {
        "path": model,
        "format": "onnx",
        "size_bytes": Path(model).stat().st_size,
        "config": meta.config,
        "tokenizer": {
            "name": tok.name,
            "n_vocab": tok.n_vocab,
            "special_tokens": tok.special_tokens,
            "pattern": tok.pattern,
        },
        "export": meta.export,
        "inputs": [_io(i) for i in session.session.get_inputs()],
        "outputs": [_io(o) for o in session.session.get_outputs()],
    }


def _print_onnx(doc: dict[str, Any]) -> None:
    config = dict(doc["config"])
    ordered = {k: config.pop(k) for k in _CONFIG_ORDER if k in config} | config
    tok = doc["tokenizer"]
    click.echo(f"{doc['path']}: {doc['size_bytes'] / 1e6:.2f} MB")
    click.echo("config:    " + ", ".join(f"{k}={v}" for k, v in ordered.items()))
    specials = ", ".join(f"{k}={v}" for k, v in tok["special_tokens"].items()) or "none"
    click.echo(f"tokenizer: {tok['name']}, {tok['n_vocab']} ids (special: {specials})")
    click.echo("export:")
    for key, value in doc["export"].items():
        click.echo(f"  {key:<15} {_plain(value)}")
    for title in ("inputs", "outputs"):
        click.echo(f"{title}:")
        for row in doc[title]:
            dims = ", ".join(str(d) for d in row["shape"])
            click.echo(f"  {row['name']:<28} {row['type']:<8} [{dims}]")


def _io(arg: Any) -> dict[str, Any]:
    return {"name": arg.name, "type": _dtype(arg.type), "shape": arg.shape}


def _dtype(ort_type: str) -> str:
    """``tensor(float)`` -> ``float32``: the numpy names the rest of gptkit prints."""
    inner = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(inner, inner)


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return (
            ", ".join(f"{k} x{v}" if isinstance(v, int) else f"{k}={v}" for k, v in value.items())
            or "-"
        )
    return "-" if value is None else str(value)


# ---- directories --------------------------------------------------------------------------------


def _hf_doc(path: Path) -> dict[str, Any]:
    config = _read_json(path / "config.json")
    if "model" in config and "n_layer" not in config:
        raise ModelFileError(
            f"{path} is a gptkit training checkpoint, not an export; export it with: "
            f"gptkit export --checkpoint {path}"
        )
    return {
        "path": str(path),
        "format": "hf",
        "size_bytes": sum(_files(path).values()),
        "config": {k: v for k, v in config.items() if k != "gptkit"},
        "gptkit": config.get("gptkit"),  # the exporter's record; None when not ours
        "tokenizer": _hf_tokenizer(path),
        "weights": _safetensors(path),
        "files": _files(path),
    }


def _print_hf(doc: dict[str, Any]) -> None:
    config = dict(doc["config"])
    ordered = {k: config.pop(k) for k in _HF_ORDER if k in config}
    ordered["tie_word_embeddings"] = config.get("tie_word_embeddings", True)
    tok, weights = doc["tokenizer"], doc["weights"]
    click.echo(
        f"{doc['path']}/: Hugging Face {config.get('model_type', '?')} directory, "
        f"{doc['size_bytes'] / 1e6:.2f} MB in {len(doc['files'])} files"
    )
    click.echo("config:    " + ", ".join(f"{k}={v}" for k, v in ordered.items()))
    specials = ", ".join(f"{k}={v}" for k, v in tok["special_tokens"].items()) or "none"
    click.echo(
        f"tokenizer: {tok['class'] or '?'}, {tok['n_vocab']} ids (special: {specials}), "
        f"eos {tok['eos_token'] or '-'}"
    )
    dtypes = ", ".join(f"{k} x{v}" for k, v in weights["dtypes"].items()) or "-"
    click.echo(
        f"weights:   {', '.join(weights['files']) or '-'}: {weights['n_params'] / 1e6:.2f}M "
        f"parameters in {weights['n_tensors']} tensors, {weights['size_bytes'] / 1e6:.2f} MB "
        f"({dtypes})"
    )
    made = doc["gptkit"]
    if isinstance(made, dict):
        click.echo(f"exported:  gptkit {made.get('version')} from {made.get('source') or '-'}")
    _print_files(doc["files"])


def _genai_doc(path: Path) -> dict[str, Any]:
    config = _read_json(path / "genai_config.json")
    model = config.get("model") or {}
    decoder = model.get("decoder") or {}
    filename = decoder.get("filename")
    if not isinstance(filename, str) or not (path / filename).is_file():
        raise ModelFileError(
            f"{path / 'genai_config.json'}: model.decoder.filename {filename!r} is not a file in "
            f"{path}; re-export the folder"
        )
    return {
        "path": str(path),
        "format": "genai",
        "size_bytes": sum(_files(path).values()),
        "genai": {
            "type": model.get("type"),
            "context_length": model.get("context_length"),
            "vocab_size": model.get("vocab_size"),
            "eos_token_id": model.get("eos_token_id"),
            "bos_token_id": model.get("bos_token_id"),
            "pad_token_id": model.get("pad_token_id"),
            "past_present_share_buffer": (config.get("search") or {}).get(
                "past_present_share_buffer"
            ),
            "max_length": (config.get("search") or {}).get("max_length"),
            "inputs": decoder.get("inputs") or {},
            "outputs": decoder.get("outputs") or {},
        },
        "genai_config": config,
        "model": _onnx_doc(str(path / filename)),
        "files": _files(path),
    }


def _print_genai(doc: dict[str, Any]) -> None:
    genai = doc["genai"]
    click.echo(
        f"{doc['path']}/: onnxruntime-genai directory, {doc['size_bytes'] / 1e6:.2f} MB in "
        f"{len(doc['files'])} files"
    )
    click.echo(
        f"genai:     type {genai['type']}, context {genai['context_length']}, max_length "
        f"{genai['max_length']}, past_present_share_buffer "
        f"{str(genai['past_present_share_buffer']).lower()}, eos/bos/pad "
        f"{genai['eos_token_id']}/{genai['bos_token_id']}/{genai['pad_token_id']}"
    )
    for title in ("inputs", "outputs"):
        names = ", ".join(f"{k}={v}" for k, v in genai[title].items()) or "-"
        click.echo(f"  {title + ':':<9}{names}")
    _print_files(doc["files"])
    click.echo("")
    _print_onnx(doc["model"])


def _print_files(files: dict[str, int]) -> None:
    click.echo("files:")
    for name, size in files.items():
        shown = f"{size / 1e6:.2f} MB" if size >= 100_000 else f"{size / 1e3:.1f} KB"
        click.echo(f"  {name:<28} {shown:>10}")


def _files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def _hf_tokenizer(path: Path) -> dict[str, Any]:
    """Size and special tokens from tokenizer.json (else vocab.json), plus tokenizer_config."""
    tok_config = (
        _read_json(path / "tokenizer_config.json")
        if (path / "tokenizer_config.json").is_file()
        else {}
    )
    ids: set[int] = set()
    specials: dict[str, int] = {}
    if (path / "tokenizer.json").is_file():
        doc = _read_json(path / "tokenizer.json")
        vocab = (doc.get("model") or {}).get("vocab") or {}
        added = doc.get("added_tokens") or []
        added = [t for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)]
        specials = {str(t.get("content")): t["id"] for t in added if t.get("special")}
        ids = {*vocab.values(), *(t["id"] for t in added)}
    elif (path / "vocab.json").is_file():
        ids = set(_read_json(path / "vocab.json").values())
    eos = tok_config.get("eos_token")
    return {
        "class": tok_config.get("tokenizer_class"),
        "n_vocab": len(ids),
        "special_tokens": specials,
        "eos_token": eos.get("content") if isinstance(eos, dict) else eos,
    }


def _safetensors(path: Path) -> dict[str, Any]:
    """Tensor count, parameters and dtypes from the safetensors headers (no tensor is read)."""
    files = sorted(p.name for p in path.glob("*.safetensors"))
    dtypes: dict[str, int] = {}
    n_params = n_tensors = size = 0
    for name in files:
        file = path / name
        size += file.stat().st_size
        for key, entry in _safetensors_header(file).items():
            if key == "__metadata__":
                continue
            n_tensors += 1
            dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + 1
            count = 1
            for dim in entry["shape"]:
                count *= dim
            n_params += count
    return {
        "files": files,
        "size_bytes": size,
        "n_tensors": n_tensors,
        "n_params": n_params,
        "dtypes": dtypes,
    }


def _safetensors_header(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
        if not isinstance(header, dict) or not all(
            isinstance(v, dict) and "dtype" in v and "shape" in v
            for k, v in header.items()
            if k != "__metadata__"
        ):
            raise ValueError("unexpected header")
    except (OSError, ValueError, struct.error) as e:
        raise ModelFileError(f"{file} is not a readable safetensors file ({e})") from None
    return header


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not readable JSON ({e}); re-export the folder") from None
    if not isinstance(doc, dict):
        raise ModelFileError(f"{path}: expected a JSON object; re-export the folder")
    return doc
