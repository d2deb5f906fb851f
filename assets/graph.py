"""The whole asset graph of an inventory: every family's factory, applied to every entry."""

from __future__ import annotations

import dagster as dg

from assets._keys import endpoint_key
from assets.clusters import build_cluster_defs
from assets.endpoints import build_endpoint_defs
from assets.mesh import build_mesh_link_defs
from assets.orchestrator import build_orchestrator_defs
from assets.training import build_training_run_defs
from assets.weights import build_model_weights_defs
from homelab_dagster.inventory import Inventory, TrainingRun

__all__ = ["build_homelab_defs"]


def build_homelab_defs(inventory: Inventory) -> dg.Definitions:
    """Clusters, mesh links, training runs, model weights, endpoints and the orchestrator of
    ``inventory``."""
    runs_by_model: dict[str, dict[str, TrainingRun]] = {name: {} for name in inventory.models}
    for run_name, run in inventory.training_runs.items():
        runs_by_model[run.model][run_name] = run
    return dg.Definitions.merge(
        *(
            build_cluster_defs(name, c, inventory.components)
            for name, c in inventory.clusters.items()
        ),
        *(
            build_mesh_link_defs(
                link,
                inventory.mesh,
                _namespaces(inventory, link.source),
                exported=[
                    endpoint_key(name)
                    for name, e in inventory.endpoints.items()
                    if e.cluster == link.target and e.export_to_mesh
                ],
            )
            for link in inventory.mesh.links
        ),
        *(
            build_training_run_defs(
                name, r, inventory.models[r.model], inventory.clusters[r.cluster]
            )
            for name, r in inventory.training_runs.items()
        ),
        *(
            build_model_weights_defs(name, m, runs_by_model[name])
            for name, m in inventory.models.items()
        ),
        *(
            build_endpoint_defs(
                name,
                e,
                inventory.models[e.model],
                inventory.clusters[e.cluster],
                inventory.mesh.export_label,
            )
            for name, e in inventory.endpoints.items()
        ),
        build_orchestrator_defs(inventory.orchestrator),
    )


def _namespaces(inventory: Inventory, cluster: str) -> tuple[str, ...]:
    return tuple(inventory.clusters[cluster].namespaces)
