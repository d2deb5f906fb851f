"""What the CLI prints: the consoles, and core errors turned into messages and exit codes."""

from __future__ import annotations

import typer
from rich.console import Console

from homelab_dagster.errors import HomelabError, InventoryError
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings

__all__ = ["console", "err_console", "fail", "load_for"]

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
