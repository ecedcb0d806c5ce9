"""The ``gptkit`` command line: train, export, run (and, with no command, all three in a row).

The CLI modules import at their top only click, the standard library and the torch-free modules
whose defaults and choices their ``--help`` shows (``runtime.sampling``, ``export.options``,
``gpt_core.train_config``, ...), so every ``--help`` answers at once and ``gptkit run`` works where
PyTorch is not installed. Each command imports its layer when it runs, and its own module only
when it is used (``COMMANDS``), so `gptkit run` starts without what train and export import.
Library errors (``GptkitError``) become one ``Error: ...`` line and exit code 1; usage errors
exit 2; no user mistake ends in a traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from gptkit import __version__
from runtime.errors import GptkitError
from runtime.files import DEFAULT_MODEL

DEFAULT_PROMPT = "ROMEO:"

# command -> the module that defines it, as ``<name>_command``. A command's module is imported
# when the command is used, so `gptkit run` does not import what train and export need first.
COMMANDS = {
    "train": "gptkit.train_cmd",
    "export": "gptkit.export_cmd",
    "run": "gptkit.run_cmd",
    "inspect": "gptkit.inspect_cmd",
    "serve": "gptkit.serve_cmd",
}


class _LazyCommands(dict[str, Any]):
    """``Group.commands`` whose values are imported on first access (names are known at once)."""

    def __getitem__(self, name: str) -> click.Command:
        value = super().__getitem__(name)
        if isinstance(value, str):
            value = getattr(importlib.import_module(value), f"{name}_command")
            super().__setitem__(name, value)
        command: click.Command = value
        return command

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def values(self) -> Any:
        return [self[name] for name in self]

    def items(self) -> Any:
        return [(name, self[name]) for name in self]


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
    commands = cli.commands
    ctx.invoke(commands["train"])
    ctx.invoke(commands["export"], output=DEFAULT_MODEL)
    ctx.invoke(commands["run"], prompt=DEFAULT_PROMPT, model=DEFAULT_MODEL)


cli.commands = _LazyCommands(COMMANDS)


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="gptkit")


if __name__ == "__main__":  # pragma: no cover
    main()  # click exits with the command's status
