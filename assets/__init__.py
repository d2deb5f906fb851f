"""Asset factories: each turns inventory entries into asset definitions and their checks."""

from assets._keys import (
    INVENTORY_KEY,
    cluster_key,
    endpoint_key,
    mesh_link_key,
    model_weights_key,
    training_run_key,
)
from assets._stack import PENDING_TAGS
from assets.clusters import build_cluster_defs
from assets.endpoints import build_endpoint_defs
from assets.graph import build_homelab_defs
from assets.inventory import build_inventory_defs
from assets.jobs import CLUSTERS_TAG, build_jobs, cluster_selection
from assets.mesh import build_mesh_link_defs
from assets.training import build_training_run_defs
from assets.weights import build_model_weights_defs

__all__ = [
    "CLUSTERS_TAG",
    "INVENTORY_KEY",
    "PENDING_TAGS",
    "build_cluster_defs",
    "build_endpoint_defs",
    "build_homelab_defs",
    "build_inventory_defs",
    "build_jobs",
    "build_mesh_link_defs",
    "build_model_weights_defs",
    "build_training_run_defs",
    "cluster_key",
    "cluster_selection",
    "endpoint_key",
    "mesh_link_key",
    "model_weights_key",
    "training_run_key",
]
