"""``training_run/<run>``: a Flyte workflow that trains a model on its cluster's GPUs."""

from __future__ import annotations

import dagster as dg

from assets._keys import INVENTORY_KEY, cluster_key, training_run_key
from assets._pending import PENDING_TAGS, not_built_yet
from homelab_dagster.inventory import TrainingRun

__all__ = ["build_training_run_defs"]


def build_training_run_defs(name: str, run: TrainingRun) -> dg.Definitions:
    """The asset of training run ``name``."""
    key = training_run_key(name)

    @dg.asset(
        key=key,
        deps=[INVENTORY_KEY, cluster_key(run.cluster)],
        tags=PENDING_TAGS,
        group_name="ml",
        kinds={"flyte"},
        description=f"Trains {run.model} on {run.cluster} ({run.nodes} x {run.gpus_per_node} GPUs).",
    )
    def _training_run() -> None:
        not_built_yet(key, "launching a Flyte training run")

    return dg.Definitions(assets=[_training_run])
