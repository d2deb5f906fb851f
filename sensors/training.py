"""Training cadence: one Dagster schedule per training run that declares a cron ``schedule``.

A schedule materialises the run and its model's weights (train, then register and gate).
On the twin every schedule starts stopped (a laptop should not train at 2 a.m. unasked);
on the homelab they start running. Either way the UI can toggle them.
"""

from __future__ import annotations

import re

import dagster as dg

from assets._keys import model_weights_key, training_run_key
from homelab_dagster.inventory import Inventory
from homelab_dagster.settings import Target

__all__ = ["build_training_schedules", "schedule_name"]


def schedule_name(run: str) -> str:
    """The schedule of training run ``run``: ``training_<run>`` (Dagster-safe)."""
    return "training_" + re.sub(r"[^A-Za-z0-9_]", "_", run)


def build_training_schedules(inventory: Inventory, target: Target) -> dg.Definitions:
    """The schedules of ``inventory``'s training runs, stopped by default on the twin."""
    status = (
        dg.DefaultScheduleStatus.STOPPED
        if target is Target.TWIN
        else dg.DefaultScheduleStatus.RUNNING
    )
    schedules = [
        dg.ScheduleDefinition(
            name=schedule_name(name),
            cron_schedule=run.schedule,
            target=dg.AssetSelection.assets(training_run_key(name), model_weights_key(run.model)),
            default_status=status,
            description=f"Trains {run.model} with {name} ({run.schedule}).",
        )
        for name, run in inventory.training_runs.items()
        if run.schedule
    ]
    return dg.Definitions(schedules=schedules)
