"""The code location: the inventory's asset graph, its checks, jobs, schedules and resources.

:func:`build_definitions` assembles them for given settings and inventory (the tests call
it); ``defs`` is that assembly for the environment's settings, which ``workspace.yaml``, the
UI, the daemon and the CLI load. Nothing here decides anything: the factories are in
``assets/`` and ``sensors/``, and the deployment (resources, executor, capabilities) is
chosen in :mod:`resources.deployment`.
"""

import dagster as dg

from assets import build_homelab_defs, build_inventory_defs, build_jobs
from homelab_dagster.inventory import Inventory
from homelab_dagster.loader import inventory_or_none
from homelab_dagster.settings import Settings
from resources.deployment import build_deployment
from sensors.alerts import build_alert_sensor
from sensors.failures import build_failure_sensor
from sensors.git import build_git_sensor
from sensors.reconcile import build_reconcile_defs
from sensors.steps import build_step_pod_sensor
from sensors.training import build_training_schedules

__all__ = ["build_definitions", "defs", "job"]


def build_definitions(settings: Settings, inventory: Inventory | None) -> dg.Definitions:
    """Everything the code location holds, for ``settings`` and ``inventory`` (None when the
    inventory is invalid: then only its asset, whose check reports the problems)."""
    deployment = build_deployment(settings, inventory)
    return dg.Definitions.merge(
        build_inventory_defs(settings.inventory_path),
        build_homelab_defs(inventory) if inventory else dg.Definitions(),
        build_jobs(inventory),
        build_training_schedules(inventory, running=deployment.schedules_running)
        if inventory
        else dg.Definitions(),
        build_git_sensor(running=deployment.git_sensor_running),
        build_reconcile_defs(
            inventory,
            cron=settings.reconcile_cron,
            running=deployment.reconcile_running,
            repair_families=deployment.auto_repair,
            automation_running=deployment.automation_running,
            watch_s=settings.drift_watch_s,
        )
        if inventory
        else dg.Definitions(),
        build_failure_sensor(running=deployment.reconcile_running),
        build_alert_sensor(running=deployment.reconcile_running),
        build_step_pod_sensor(running=deployment.reconcile_running)
        if deployment.steps_as_pods
        else dg.Definitions(),
        dg.Definitions(resources=deployment.resources, executor=deployment.executor),
    )


_settings = Settings.from_env()
defs = build_definitions(_settings, inventory_or_none(_settings.inventory_path))


def job(name: str) -> dg.JobDefinition:
    """Job ``name`` of ``defs``: how a run started from Python finds it again in the step
    processes (``dg.build_reconstructable_job("homelab_dagster.definitions", "job", (name,))``)."""
    return defs.resolve_job_def(name)
