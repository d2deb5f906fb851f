"""Training cadence: one Dagster schedule per training run that declares a cron ``schedule``.

A schedule materialises the run and its model's weights (train, then register and gate).
Whether they start running is the deployment's choice (``running``: on the homelab they
do; on the twin they start stopped, since a laptop should not train at 2 a.m. unasked).
Either way the UI can toggle them.
"""

from __future__ import annotations

import re

import dagster as dg

from assets._keys import model_weights_key, training_run_key
from homelab_dagster.inventory import Inventory

__all__ = ["build_training_schedules", "schedule_name"]


def schedule_name(run: str) -> str:
    """The schedule of training run ``run``: ``training_<run>`` (Dagster-safe)."""
    return "training_" + re.sub(r"[^A-Za-z0-9_]", "_", run)


def build_training_schedules(inventory: Inventory, *, running: bool) -> dg.Definitions:
    """The schedules of ``inventory``'s training runs, running from the start if ``running``."""
    status = dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED
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
