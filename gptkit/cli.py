"""The ``gptkit`` command line: train, export, run (and, with no command, all three in a row).

The CLI modules import at their top only click, the standard library and the torch-free modules
whose defaults and choices their ``--help`` shows (``runtime.sampling``, ``export.options``,
``gpt_core.train_config``, ...), so every ``--help`` answers at once and ``gptkit run`` works where
PyTorch is not installed. Each command imports its layer when it runs. Library errors (``GptkitError``) become one ``Error: ...``
line and exit code 1; usage errors exit 2; no user mistake ends in a traceback.
"""

from __future__ import annotations

import click

from gptkit import __version__
from gptkit.export_cmd import export_command
from gptkit.inspect_cmd import inspect_command
from gptkit.run_cmd import run_command
from gptkit.serve_cmd import serve_command
from gptkit.train_cmd import train_command
from runtime.errors import GptkitError
from runtime.files import DEFAULT_MODEL

DEFAULT_PROMPT = "ROMEO:"


class GptkitGroup(click.Group):
    """A click group that turns gptkit's errors into one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GptkitError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=GptkitGroup, invoke_without_command=True)
@click.version_option(__version__, prog_name="gptkit")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Train a GPT from scratch, export it to ONNX with a KV cache, run it anywhere.

    With no command, runs the whole pipeline: `gptkit train` on the bundled Tiny Shakespeare,
    `gptkit export model.onnx`, then `gptkit run --prompt "ROMEO:"`.
    """
    if ctx.invoked_subcommand is not None:
        return
    click.echo(
        "gptkit: train -> export -> run (Ctrl-C stops; `gptkit --help` lists the commands)",
        err=True,
    )
    ctx.invoke(train_command)
    ctx.invoke(export_command, output=DEFAULT_MODEL)
    ctx.invoke(run_command, prompt=DEFAULT_PROMPT, model=DEFAULT_MODEL)


cli.add_command(train_command, "train")
cli.add_command(export_command, "export")
cli.add_command(run_command, "run")
cli.add_command(inspect_command, "inspect")
cli.add_command(serve_command, "serve")


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="gptkit")


if __name__ == "__main__":  # pragma: no cover
    main()  # click exits with the command's status
