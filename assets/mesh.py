"""``mesh_link/<from>__<to>``: ``from`` reaches the services ``to`` exports (Linkerd)."""

from __future__ import annotations

import dagster as dg

from assets._keys import cluster_key, mesh_link_key
from assets._pending import PENDING_TAGS, not_built_yet
from homelab_dagster.inventory import MeshLink

__all__ = ["build_mesh_link_defs"]


def build_mesh_link_defs(link: MeshLink) -> dg.Definitions:
    """The asset of one mesh link; it depends on both clusters."""
    key = mesh_link_key(link.source, link.target)

    @dg.asset(
        key=key,
        deps=[cluster_key(link.source), cluster_key(link.target)],
        tags=PENDING_TAGS,
        group_name="mesh",
        kinds={"pulumi", "kubernetes"},
        description=f"{link.source} reaches the services {link.target} exports.",
    )
    def _mesh_link() -> None:
        not_built_yet(key, "linking clusters through the Pulumi Automation API")

    return dg.Definitions(assets=[_mesh_link])
