"""`gptkit run` (placeholder until its issue lands)."""

from __future__ import annotations

import click


@click.command("run")
def run_command(**kwargs) -> None:
    """Not implemented yet."""
    raise click.ClickException("gptkit run is not implemented yet")
