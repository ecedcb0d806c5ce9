"""`gptkit run`: generate text from an exported model with onnxruntime (no PyTorch needed)."""

from __future__ import annotations

import time

import click

from runtime.errors import ConfigError, require


@click.command("run")
@click.option(
    "--prompt",
    "-p",
    help="Text to continue; '-' reads standard input. Without it: an interactive loop.",
)
@click.option(
    "--model",
    "-m",
    default="model.onnx",
    show_default=True,
    type=click.Path(),
    help="Exported .onnx file.",
)
@click.option("--max-new-tokens", "-n", type=int, default=200, show_default=True)
@click.option(
    "--temperature", "-t", type=float, default=0.8, show_default=True, help="0 means greedy."
)
@click.option(
    "--top-k",
    type=int,
    default=0,
    show_default=True,
    help="Keep the k most likely tokens (0 = off).",
)
@click.option(
    "--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling (1 = off)."
)
@click.option(
    "--min-p",
    type=float,
    default=0.0,
    show_default=True,
    help="Drop tokens below min_p x the top probability (0 = off).",
)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 = off.")
@click.option("--seed", type=int, help="Make the output reproducible.")
@click.option("--stop", multiple=True, help="Stop when this string appears (repeatable).")
@click.option(
    "--device", default="cpu", show_default=True, help="cpu, or cuda (needs onnxruntime-gpu)."
)
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option(
    "--context",
    type=click.Choice(["error", "truncate"]),
    default="error",
    show_default=True,
    help="Past the context length: fail, or keep the most recent tokens.",
)
@click.option("--echo", is_flag=True, help="Print the prompt before the continuation.")
def run_command(
    prompt: str | None = None,
    model: str = "model.onnx",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    device: str = "cpu",
    threads: int | None = None,
    context: str = "error",
    echo: bool = False,
) -> None:
    """Continue a prompt with an exported model, streaming the text to stdout.

    Only the continuation goes to stdout (with --echo, the prompt first); statistics and warnings
    go to stderr, so the command composes in pipes.
    """
    require("onnxruntime", extra=None, purpose="gptkit run")
    from runtime.model import load
    from runtime.sampling import SamplingConfig

    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
    )
    loaded = load(model, device=device, threads=threads)
    if prompt is None:
        _interactive(loaded, sampling, context)
        return
    if prompt == "-":
        prompt = _read_stdin()
    _complete(loaded, prompt, sampling, context, echo)


def _complete(model, prompt: str, sampling, context: str, echo: bool) -> None:
    out = click.get_text_stream("stdout")
    if echo:
        out.write(prompt)
    started = time.perf_counter()
    count = 0
    try:
        for piece in model.stream(prompt, sampling, context=context):
            out.write(piece)
            out.flush()
            count += 1
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        click.echo("Interrupted.", err=True)
        raise SystemExit(130) from None
    out.write("\n")
    out.flush()
    elapsed = time.perf_counter() - started
    click.echo(f"[{count} pieces in {elapsed:.2f} s, {model.device}]", err=True)


def _interactive(model, sampling, context: str) -> None:
    click.echo(f"{model}. Type a prompt and press Enter; Ctrl-D to quit.", err=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            return
        try:
            _complete(model, line, sampling, context, echo=False)
        except SystemExit:
            continue


def _read_stdin() -> str:
    data = click.get_binary_stream("stdin").read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"standard input is not UTF-8 text (invalid byte at offset {e.start})"
        ) from None
