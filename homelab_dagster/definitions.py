"""The code location: the inventory's asset graph, its checks, jobs, sensors and resources."""

import dagster as dg

from assets import build_homelab_defs, build_inventory_defs, build_stack_job_defs
from assets.stacks import STACK_EXECUTOR
from homelab_dagster.launch import UP_JOB
from homelab_dagster.loader import inventory_or_none
from homelab_dagster.settings import Settings
from resources.ml import build_ml_resources
from resources.stacks import build_stack_resources
from sensors.training import build_training_schedules

settings = Settings.from_env()
inventory = inventory_or_none(settings.inventory_path)

defs = dg.Definitions.merge(
    build_inventory_defs(settings.inventory_path),
    build_homelab_defs(inventory) if inventory else dg.Definitions(),
    build_stack_job_defs(inventory) if inventory else dg.Definitions(),
    dg.Definitions(
        jobs=[
            dg.define_asset_job(
                UP_JOB, selection=dg.AssetSelection.all(), executor_def=STACK_EXECUTOR
            )
        ]
    ),
    build_training_schedules(inventory, settings.target) if inventory else dg.Definitions(),
    dg.Definitions(resources=build_ml_resources(settings, inventory)),
    dg.Definitions(resources=build_stack_resources(settings, inventory)),
)
