"""``homelab reconcile`` (``make reconcile-all``): look for drift now, and repair it.

Runs the ``reconcile`` job like the schedule does (every stack refreshed in preview mode,
every link and cluster checked, every trained model's weights verified, in parallel), prints
what drifted, then materialises the drifted assets whose family has auto-repair on (the
deployment's, ``$HOMELAB_AUTO_REPAIR``) and that are not stalled; ``--no-repair`` only looks.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from homelab_dagster.cli.output import console, err_console, error_exit, exit_if_failed, load_for
from homelab_dagster.errors import HomelabError

__all__ = ["reconcile"]


def reconcile(
    repair: Annotated[
        bool, typer.Option("--repair/--no-repair", help="Repair what drifted (auto-repair on).")
    ] = True,
) -> None:
    """Look for drift in every stack, link and weights version; repair it where allowed."""

    from homelab_dagster.cli import launch
    from homelab_dagster.reconcile import repair_decision
    from resources.deployment import build_deployment
    from sensors.failures import repair_record
    from sensors.reconcile import drifted_assets

    settings, inventory = load_for(None)
    try:
        launch.start_world(settings, inventory, None)
    except HomelabError as exc:
        raise error_exit(exc) from exc
    checked = launch.materialize(
        None, settings=settings, console=console, job="reconcile", title="reconciling"
    )
    for step, message in checked.failures.items():  # a blocking check failed: said, go on
        err_console.print(f"[red]✗ {step}[/]: {message}", highlight=False, soft_wrap=True)
    families = build_deployment(settings, inventory).auto_repair
    with launch.open_instance() as instance:
        drifted = drifted_assets(instance, checked.run_id)
        chosen = []
        for key, why in sorted(drifted.items()):
            console.print(f"[yellow]drift[/] {key.to_user_string()}: {'; '.join(why)}")
            record = repair_record(instance, key)
            enabled = repair and key.path[0] in families
            go, reason = repair_decision(
                key.to_user_string(), record, enabled=enabled, now=time.time()
            )
            console.print(f"  {reason}", highlight=False)
            if go:
                chosen.append(key)
    if not drifted:
        console.print(f"[green]✓[/] no drift (run {checked.run_id})")
        return
    if not chosen:
        raise typer.Exit(code=1)  # drift left for a person
    outcome = launch.materialize(chosen, settings=settings, console=console, title="repairing")
    exit_if_failed(outcome, settings, "repairing")
    names = ", ".join(k.to_user_string() for k in chosen)
    console.print(f"[green]✓[/] repaired {names} (run {outcome.run_id})")
