"""Asset keys, named from inventory entries. Every family's key is built here and only here."""

from __future__ import annotations

import dagster as dg

__all__ = [
    "INVENTORY_KEY",
    "ORCHESTRATOR_KEY",
    "cluster_key",
    "endpoint_key",
    "mesh_link_key",
    "model_weights_key",
    "training_run_key",
]

INVENTORY_KEY = dg.AssetKey("homelab_inventory")
ORCHESTRATOR_KEY = dg.AssetKey("orchestrator")


def cluster_key(cluster: str) -> dg.AssetKey:
    """``cluster/<cluster>``."""
    return dg.AssetKey(["cluster", cluster])


def mesh_link_key(source: str, target: str) -> dg.AssetKey:
    """``mesh_link/<from>__<to>``."""
    return dg.AssetKey(["mesh_link", f"{source}__{target}"])


def training_run_key(run: str) -> dg.AssetKey:
    """``training_run/<run>``."""
    return dg.AssetKey(["training_run", run])


def model_weights_key(model: str) -> dg.AssetKey:
    """``model_weights/<model>``."""
    return dg.AssetKey(["model_weights", model])


def endpoint_key(endpoint: str) -> dg.AssetKey:
    """``vllm_endpoint/<endpoint>``."""
    return dg.AssetKey(["vllm_endpoint", endpoint])
