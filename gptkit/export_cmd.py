"""`gptkit export` (placeholder until its issue lands)."""

from __future__ import annotations

import click


@click.command("export")
def export_command(**kwargs) -> None:
    """Not implemented yet."""
    raise click.ClickException("gptkit export is not implemented yet")
