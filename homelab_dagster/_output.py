"""What the CLI prints: the consoles, and core errors turned into messages and exit codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console

from homelab_dagster.errors import HomelabError, InventoryError
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings

if TYPE_CHECKING:
    from homelab_dagster.launch import RunOutcome

__all__ = ["console", "err_console", "exit_if_failed", "fail", "load_for"]

console = Console()
err_console = Console(stderr=True)


def fail(exc: HomelabError) -> typer.Exit:
    """Print ``exc`` for a person; the exit (code 1) to raise."""
    if isinstance(exc, InventoryError):
        err_console.print(f"[bold red]invalid inventory[/] {exc.file}")
        for problem in exc.problems:
            err_console.print(f"  [red]✗[/] {problem}", highlight=False, soft_wrap=True)
        err_console.print(f"[red]{len(exc.problems)} problem(s)[/]")
    else:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


def load_for(env: str | None) -> tuple[Settings, Inventory]:
    """The settings and inventory a command works on; ``env`` must name one of its clusters.

    Exits 1 (a core error, printed) or 2 (an unknown cluster: a usage error).
    """
    try:
        settings = Settings.from_env()
        inventory = load_inventory(settings.inventory_path).inventory
    except HomelabError as exc:
        raise fail(exc) from exc
    if env is not None and env not in inventory.clusters:
        known = ", ".join(inventory.clusters)
        err_console.print(f"[bold red]error:[/] unknown cluster {env!r} (clusters: {known})")
        raise typer.Exit(code=2)
    return settings, inventory


def exit_if_failed(outcome: RunOutcome, settings: Settings, doing: str = "") -> None:
    """Print each failed step's message; if the run failed, say so and exit 1. ``doing``: what
    the run was doing, for the last line."""
    console.print()
    for step, message in outcome.failures.items():
        err_console.print(f"[red]✗ {step}[/]: {message}", highlight=False, soft_wrap=True)
    if not outcome.success:
        err_console.print(
            f"[bold red]run {outcome.run_id} failed[/]{f' ({doing})' if doing else ''}"
        )
        err_console.print(f"  what the steps printed themselves: {settings.steps_log}")
        raise typer.Exit(code=1)
