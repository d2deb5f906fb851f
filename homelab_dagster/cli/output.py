"""What the CLI prints: the consoles, core errors turned into messages and exit codes, and
where the step processes' own output goes while a run's progress is drawn."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from homelab_dagster.errors import HomelabError, InventoryError
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings

if TYPE_CHECKING:
    import dagster as dg

    from homelab_dagster.cli.launch import RunOutcome

__all__ = [
    "console",
    "err_console",
    "error_exit",
    "exit_if_failed",
    "load_for",
    "print_preview",
    "steps_output_to",
]

console = Console()
err_console = Console(stderr=True)


def print_preview(observation: dg.AssetObservation) -> None:
    """One stack's preview (the ``preview`` job's observation of its asset): its count of
    changes and Pulumi's plan, or why it was not previewed."""
    metadata = observation.metadata
    name = observation.asset_key.to_user_string()
    if "not_previewed" in metadata:
        console.print(f"[bold]{name}[/]: not previewed: {metadata['not_previewed'].value}")
        return
    changed = metadata.get("pulumi_changed")
    count = changed.value if changed is not None else "?"
    console.print(f"[bold]{name}[/]: {count} change(s)")
    plan = metadata.get("pulumi_plan")
    if plan is not None and count:
        console.print(str(plan.value), highlight=False)


def error_exit(exc: HomelabError) -> typer.Exit:
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
        raise error_exit(exc) from exc
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


@contextlib.contextmanager
def steps_output_to(path: Path) -> Iterator[None]:
    """While inside, send what child processes print themselves to ``path`` (appended to,
    mode 0600); this process's own ``sys.stdout`` and ``sys.stderr``, and so the consoles,
    keep the terminal.

    Dagster's step processes (and the server they fork from, started by the first run) inherit
    file descriptors 1 and 2 from this process: what they print outside Dagster's logging
    (a crashing step's last words, a library's warnings) would otherwise break the progress
    display. Everything a step logs through Dagster is in the run's event log either way.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {1: os.dup(1), 2: os.dup(2)}
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    streams = sys.stdout, sys.stderr
    sys.stdout = open(saved[1], "w", buffering=1, closefd=False, encoding="utf-8")  # noqa: SIM115
    sys.stderr = open(saved[2], "w", buffering=1, closefd=False, encoding="utf-8")  # noqa: SIM115
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        sys.stdout, sys.stderr = streams
        for fd in (log, *saved.values()):
            os.close(fd)
