"""The code location's jobs, their names and tags, and which assets a cluster's run selects.

- ``up``: every asset (the CLI's ``homelab up``, ``make up``);
- ``preview``: one op per stack, in parallel, running ``pulumi preview``. The per-resource
  plan goes to the run's log and, as an observation of the asset (not a materialisation:
  nothing changed), to the asset's metadata;
- ``teardown``: one op per stack running ``pulumi destroy``; links first, then each
  cluster once every link touching it is gone (reverse dependency order).

No job chooses its executor: the deployment does, once, for every job
(:mod:`resources.deployment`). Stack ops carry the tag ``homelab/clusters`` (the clusters a
stack touches), which the CLI uses to select one cluster's stacks.
"""

from collections.abc import Sequence

import dagster as dg

from assets._keys import INVENTORY_KEY, cluster_key, mesh_link_key
from assets._stack import STACK_STEP_TAGS, StackSpec, step_failure
from assets.clusters import cluster_stack
from assets.mesh import mesh_link_stack
from homelab_dagster.errors import HomelabError
from homelab_dagster.inventory import Inventory
from resources.kubernetes import KubernetesClusters
from resources.pulumi import PulumiStacks

__all__ = [
    "CLUSTERS_TAG",
    "PREVIEW_JOB",
    "TEARDOWN_JOB",
    "UP_JOB",
    "build_jobs",
    "cluster_selection",
]

UP_JOB = "up"
PREVIEW_JOB = "preview"
TEARDOWN_JOB = "teardown"
CLUSTERS_TAG = "homelab/clusters"  # on stack ops: the clusters a stack touches


def cluster_selection(inventory: Inventory, cluster: str) -> tuple[set[dg.AssetKey], list[str]]:
    """The assets of one ``cluster`` and of the mesh links that touch it, and the clusters
    those involve (a link needs both its clusters' base state: their
    ``linkerd-multicluster`` namespace)."""
    links = [lk for lk in inventory.mesh.links if cluster in {lk.source, lk.target}]
    clusters = sorted({cluster} | {c for lk in links for c in (lk.source, lk.target)})
    keys = {INVENTORY_KEY, *(cluster_key(c) for c in clusters)}
    keys |= {mesh_link_key(lk.source, lk.target) for lk in links}
    return keys, clusters


def build_jobs(inventory: Inventory | None) -> dg.Definitions:
    """``up`` over every asset; ``preview`` and ``teardown`` over every stack of ``inventory``."""
    up = dg.define_asset_job(
        UP_JOB, selection=dg.AssetSelection.all(), description="Materialise the whole homelab."
    )
    if inventory is None:
        return dg.Definitions(jobs=[up])
    clusters = [cluster_stack(n, c, inventory.components) for n, c in inventory.clusters.items()]
    links = [
        mesh_link_stack(link, inventory.mesh, tuple(inventory.clusters[link.source].namespaces))
        for link in inventory.mesh.links
    ]
    return dg.Definitions(jobs=[up, _preview_job(clusters + links), _teardown_job(clusters, links)])


def _op_tags(spec: StackSpec) -> dict[str, object]:
    return {CLUSTERS_TAG: ",".join(spec.clusters), **STACK_STEP_TAGS}


def _preview_op(spec: StackSpec) -> dg.OpDefinition:
    @dg.op(
        name=f"preview_{spec.slug}",
        tags=_op_tags(spec),
        description=f"pulumi preview of {spec.key.to_user_string()}'s stack.",
    )
    def _op(context: dg.OpExecutionContext, pulumi: PulumiStacks, kubernetes: KubernetesClusters):
        stack = pulumi.stack_name(spec.key.path)
        try:
            result = pulumi.preview(stack, spec.program(pulumi, kubernetes), context.log)
        except HomelabError as exc:
            raise step_failure(exc) from exc
        context.log.info(f"{stack}: {result.changed} change(s)\n{result.plan_markdown()}")
        context.log_event(dg.AssetObservation(asset_key=spec.key, metadata=result.metadata()))

    return _op


def _destroy_op(spec: StackSpec, after: bool) -> dg.OpDefinition:
    @dg.op(
        name=f"destroy_{spec.slug}",
        ins={"after": dg.In(dg.Nothing)} if after else {},
        tags=_op_tags(spec),
        description=f"pulumi destroy of {spec.key.to_user_string()}'s stack.",
    )
    def _op(context: dg.OpExecutionContext, pulumi: PulumiStacks):
        stack = pulumi.stack_name(spec.key.path)
        try:
            result = pulumi.destroy(stack, context.log)
        except HomelabError as exc:
            raise step_failure(exc) from exc
        context.log_event(dg.AssetObservation(asset_key=spec.key, metadata=result.metadata()))

    return _op


def _preview_job(specs: Sequence[StackSpec]) -> dg.JobDefinition:
    previews = [_preview_op(s) for s in specs]

    @dg.job(name=PREVIEW_JOB, description="What materialising would change (pulumi preview).")
    def preview() -> None:
        for op in previews:
            op()

    return preview


def _teardown_job(clusters: Sequence[StackSpec], links: Sequence[StackSpec]) -> dg.JobDefinition:
    link_ops = {s.key: _destroy_op(s, after=False) for s in links}
    touching = {
        c.key: [ln.key for ln in links if set(c.clusters) & set(ln.clusters)] for c in clusters
    }
    cluster_ops = {c.key: _destroy_op(c, after=bool(touching[c.key])) for c in clusters}

    @dg.job(
        name=TEARDOWN_JOB,
        description="Destroy every stack: mesh links first, then the clusters (pulumi destroy).",
    )
    def teardown() -> None:
        gone = {key: op() for key, op in link_ops.items()}
        for key, op in cluster_ops.items():
            if touching[key]:
                op(after=[gone[k] for k in touching[key]])
            else:
                op()

    return teardown
