"""What the CLI prints: the consoles, and core errors turned into messages and exit codes."""

from __future__ import annotations

import typer
from rich.console import Console

from homelab_dagster.errors import HomelabError, InventoryError

__all__ = ["console", "err_console", "fail"]

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
