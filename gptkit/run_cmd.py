"""`gptkit run`: generate text from an exported model with onnxruntime (no PyTorch needed).

Only the continuation goes to stdout, so the command composes in pipes; the statistics line and
warnings go to stderr.
"""

from __future__ import annotations

import os
import sys
import time

import click

from runtime.errors import ConfigError, require
from runtime.files import DEFAULT_MODEL
from runtime.sampling import CONTEXT_MODES, DEFAULT_MAX_NEW_TOKENS, SamplingConfig

_DEFAULTS = SamplingConfig()


@click.command("run")
@click.option(
    "--prompt",
    "-p",
    help="Text to continue ('' starts a new document); '-' reads standard input. "
    "Without --prompt: an interactive loop.",
)
@click.option(
    "--model",
    "-m",
    default=DEFAULT_MODEL,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Exported .onnx file.",
)
@click.option(
    "--max-new-tokens",
    "-n",
    type=int,
    help=f"Tokens to generate [default: {DEFAULT_MAX_NEW_TOKENS}, or what fits in the context].",
)
@click.option(
    "--temperature",
    "-t",
    type=float,
    default=_DEFAULTS.temperature,
    show_default=True,
    help="0 means greedy.",
)
@click.option(
    "--top-k",
    type=int,
    default=_DEFAULTS.top_k,
    show_default=True,
    help="Keep the k most likely tokens (0 = off).",
)
@click.option(
    "--top-p",
    type=float,
    default=_DEFAULTS.top_p,
    show_default=True,
    help="Nucleus sampling (1 = off).",
)
@click.option(
    "--min-p",
    type=float,
    default=_DEFAULTS.min_p,
    show_default=True,
    help="Drop tokens below min_p x the top probability (0 = off).",
)
@click.option(
    "--repetition-penalty",
    type=float,
    default=_DEFAULTS.repetition_penalty,
    show_default=True,
    help="1 = off.",
)
@click.option("--seed", type=int, help="Make the output reproducible.")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option(
    "--device", default="cpu", show_default=True, help="cpu, or cuda (needs onnxruntime-gpu)."
)
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads [default: all cores].")
@click.option(
    "--context",
    type=click.Choice(CONTEXT_MODES),
    default=CONTEXT_MODES[0],
    show_default=True,
    help="Past the context length: fail, or keep the most recent tokens.",
)
@click.option("--echo", is_flag=True, help="Print the prompt before the continuation.")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Do not use or write the optimised-graph cache of large models (GPTKIT_CACHE_DIR).",
)
def run_command(
    prompt: str | None = None,
    model: str = DEFAULT_MODEL,
    max_new_tokens: int | None = None,
    temperature: float = _DEFAULTS.temperature,
    top_k: int = _DEFAULTS.top_k,
    top_p: float = _DEFAULTS.top_p,
    min_p: float = _DEFAULTS.min_p,
    repetition_penalty: float = _DEFAULTS.repetition_penalty,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    device: str = "cpu",
    threads: int | None = None,
    context: str = CONTEXT_MODES[0],
    echo: bool = False,
    no_cache: bool = False,
) -> None:
    """Continue a prompt with an exported model, streaming the text to stdout.

    \b
      gptkit run --prompt "ROMEO:" --seed 0
      gptkit run -p "ROMEO:" -t 0 -n 50 --stop "\\n\\n"
      echo "To be, or not" | gptkit run --prompt - --echo
      gptkit run                      # interactive: one prompt per line
    """
    require("onnxruntime", extra=None, purpose="gptkit run")
    from runtime.model import load

    sampling = SamplingConfig(  # validates every value before the model is loaded
        max_new_tokens=max_new_tokens,  # None: 200, or what fits in the context
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
    )
    loaded = load(model, device=device, threads=threads, cache=not no_cache)
    if prompt is None:
        _interactive(loaded, sampling, context)
        return
    if prompt == "-":
        prompt = _read_stdin()
    if not _complete(loaded, prompt, sampling, context, echo):
        raise SystemExit(130)


def _complete(model, prompt: str, sampling, context: str, echo: bool) -> bool:
    """Stream one continuation to stdout; False when interrupted with Ctrl-C."""
    out = sys.stdout
    stream = model.stream(prompt, sampling, context=context)  # errors surface before any output
    started = time.perf_counter()
    first: float | None = None
    interrupted = False
    try:
        if echo:
            out.write(prompt)
            out.flush()
        for piece in stream:
            first = first or time.perf_counter()
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    except KeyboardInterrupt:
        interrupted = True
        out.write("\n")
        out.flush()
    except BrokenPipeError:  # `gptkit run ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(0) from None
    _report(stream, started, first, interrupted)
    return not interrupted


def _report(stream, started: float, first: float | None, interrupted: bool) -> None:
    """One stderr line: tokens, time, speed, time to the first text, why it ended."""
    elapsed = time.perf_counter() - started
    n = len(stream.token_ids)
    reason = "interrupted" if interrupted else stream.result.finish_reason
    ttft = f", first text after {1000 * (first - started):.0f} ms" if first else ""
    rate = n / elapsed if elapsed > 0 else 0.0
    click.echo(f"[{n} tokens in {elapsed:.2f} s, {rate:.1f} tok/s{ttft}; {reason}]", err=True)


def _interactive(model, sampling, context: str) -> None:
    """One prompt per line; a bad prompt prints its error and the loop goes on."""
    from runtime.errors import GptkitError

    click.echo(
        f"{model}\nType a prompt and press Enter; Ctrl-C stops a reply, Ctrl-D quits.", err=True
    )
    if hasattr(sys.stdin, "reconfigure"):  # a non-UTF-8 line is that line's error, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        click.echo("> ", nl=False, err=True)  # stdout carries continuations only
        try:
            line = input()
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            return
        bad = next((i for i, c in enumerate(line) if "\udc80" <= c <= "\udcff"), None)
        if bad is not None:
            offset = len(line[:bad].encode("utf-8", "surrogateescape"))
            click.echo(
                f"Error: the line is not UTF-8 text (invalid byte at offset {offset})", err=True
            )
            continue
        try:
            _complete(model, line, sampling, context, echo=False)
        except GptkitError as e:
            click.echo(f"Error: {e}", err=True)


def _read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"standard input is not UTF-8 text (invalid byte at offset {e.start})"
        ) from None
