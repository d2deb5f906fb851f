"""The code location: the inventory's asset graph, its checks, jobs, sensors and resources."""

import dagster as dg

from assets import build_homelab_defs, build_inventory_defs
from homelab_dagster.launch import UP_JOB
from homelab_dagster.loader import inventory_or_none
from homelab_dagster.settings import Settings

settings = Settings.from_env()
inventory = inventory_or_none(settings.inventory_path)

defs = dg.Definitions.merge(
    build_inventory_defs(settings.inventory_path),
    build_homelab_defs(inventory) if inventory else dg.Definitions(),
    dg.Definitions(jobs=[dg.define_asset_job(UP_JOB, selection=dg.AssetSelection.all())]),
)
