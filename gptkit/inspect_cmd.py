"""`gptkit inspect` (placeholder until its issue lands)."""

from __future__ import annotations

import click


@click.command("inspect")
def inspect_command(**kwargs) -> None:
    """Not implemented yet."""
    raise click.ClickException("gptkit inspect is not implemented yet")
