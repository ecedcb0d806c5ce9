"""`gptkit train` (placeholder until its issue lands)."""

from __future__ import annotations

import click


@click.command("train")
def train_command(**kwargs) -> None:
    """Not implemented yet."""
    raise click.ClickException("gptkit train is not implemented yet")
