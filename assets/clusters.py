"""``cluster/<cluster>``: one Kubernetes cluster, provisioned by its own Pulumi stack."""

from __future__ import annotations

import dagster as dg

from assets._keys import INVENTORY_KEY, cluster_key
from assets._pending import PENDING_TAGS, not_built_yet
from homelab_dagster.inventory import Cluster

__all__ = ["build_cluster_defs"]


def build_cluster_defs(name: str, cluster: Cluster) -> dg.Definitions:
    """The asset of cluster ``name``."""
    key = cluster_key(name)

    @dg.asset(
        key=key,
        deps=[INVENTORY_KEY],
        tags=PENDING_TAGS,
        group_name="clusters",
        kinds={"pulumi", "kubernetes"},
        description=f"{name}: {cluster.purpose} ({cluster.distribution.value}, "
        f"{len(cluster.expanded_nodes())} nodes).",
        metadata={
            "distribution": cluster.distribution.value,
            "kubernetes_version": cluster.kubernetes_version,
            "nodes": len(cluster.expanded_nodes()),
            "gpus": cluster.gpu_total(),
        },
    )
    def _cluster() -> None:
        not_built_yet(key, "provisioning a cluster through the Pulumi Automation API")

    return dg.Definitions(assets=[_cluster])
