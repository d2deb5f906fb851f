"""The code location's jobs, their names and tags, and which assets a cluster's run selects.

- ``up``: every asset (the CLI's ``homelab up``, ``make up``), without the drift checks
  (an update has just made the state and the world agree);
- ``reconcile``: every check of every stack (drift first among them) and of every trained
  model's weights, one step per asset, in parallel; nothing is materialised (the repair is
  ``sensors/reconcile.py``'s);
- ``preview``: one op per stack (clusters, mesh links, endpoints), in parallel, running
  ``pulumi preview`` (an endpoint's: of the version materialising would serve). The per-resource
  plan goes to the run's log and, as an observation of the asset (not a materialisation:
  nothing changed), to the asset's metadata;
- ``teardown``: one op per stack running ``pulumi destroy``; the links and what runs on a
  cluster (its endpoints, the orchestrator) first, then each cluster once every stack
  touching it is gone (reverse dependency order).

No job chooses its executor: the deployment does, once, for every job
(:mod:`resources.deployment`). Stack ops carry the tag ``homelab/clusters`` (the clusters a
stack touches), which the CLI uses to select one cluster's stacks.
"""

from collections.abc import Sequence

import dagster as dg

from assets._keys import (
    INVENTORY_KEY,
    ORCHESTRATOR_KEY,
    cluster_key,
    endpoint_key,
    mesh_link_key,
    model_weights_key,
)
from assets._stack import (
    DRIFT_CHECK,
    STACK_STEP_TAGS,
    StackSpec,
    key_slug,
    record_preview,
    step_failure,
)
from assets.clusters import cluster_stack
from assets.endpoints import endpoint_preview_op
from assets.mesh import mesh_link_stack
from assets.weights import INTACT_CHECK
from homelab_dagster.errors import HomelabError
from homelab_dagster.inventory import Inventory
from resources.kubernetes import KubernetesClusters
from resources.pulumi import PulumiStacks

__all__ = [
    "CLUSTERS_TAG",
    "PREVIEW_JOB",
    "RECONCILE_JOB",
    "RECONCILE_TAG",
    "TEARDOWN_JOB",
    "UP_JOB",
    "build_jobs",
    "cluster_selection",
    "preview_op_name",
    "previewed_stacks",
    "stack_specs",
    "workload_stacks",
]

UP_JOB = "up"
PREVIEW_JOB = "preview"
RECONCILE_JOB = "reconcile"
RECONCILE_TAG = "homelab/reconcile"  # on reconcile runs ("check") and repair runs ("repair")
TEARDOWN_JOB = "teardown"
CLUSTERS_TAG = "homelab/clusters"  # on stack ops: the clusters a stack touches


def cluster_selection(inventory: Inventory, cluster: str) -> tuple[set[dg.AssetKey], list[str]]:
    """The assets of one ``cluster``, of the mesh links that touch it and of the orchestrator
    where it runs there, and the clusters those involve (a link needs both its clusters' base
    state: their ``linkerd-multicluster`` namespace)."""
    links = [lk for lk in inventory.mesh.links if cluster in {lk.source, lk.target}]
    clusters = sorted({cluster} | {c for lk in links for c in (lk.source, lk.target)})
    keys = {INVENTORY_KEY, *(cluster_key(c) for c in clusters)}
    keys |= {mesh_link_key(lk.source, lk.target) for lk in links}
    if cluster == inventory.orchestrator.cluster:
        keys.add(ORCHESTRATOR_KEY)  # Dagster itself runs there
    return keys, clusters


def stack_specs(inventory: Inventory) -> tuple[list[StackSpec], list[StackSpec]]:
    """The stacks of ``inventory``: its clusters', and its mesh links'."""
    clusters = [cluster_stack(n, c, inventory.components) for n, c in inventory.clusters.items()]
    links = [
        mesh_link_stack(link, inventory.mesh, tuple(inventory.clusters[link.source].namespaces))
        for link in inventory.mesh.links
    ]
    return clusters, links


def workload_stacks(inventory: Inventory) -> list[tuple[dg.AssetKey, tuple[str, ...]]]:
    """The stacks of what runs on a cluster, with that cluster: each endpoint's, and the
    orchestrator's."""
    stacks = [(endpoint_key(n), (e.cluster,)) for n, e in inventory.endpoints.items()]
    return [*stacks, (ORCHESTRATOR_KEY, (inventory.orchestrator.cluster,))]


def build_jobs(inventory: Inventory | None) -> dg.Definitions:
    """``up`` over every asset; ``reconcile``, ``preview`` and ``teardown`` over every stack
    of ``inventory``."""
    if inventory is None:
        up = dg.define_asset_job(
            UP_JOB, selection=dg.AssetSelection.all(), description="Materialise the whole homelab."
        )
        return dg.Definitions(jobs=[up])
    clusters, links = stack_specs(inventory)
    stacks = [s.key for s in clusters + links]
    drift = dg.AssetSelection.checks(*(dg.AssetCheckKey(k, DRIFT_CHECK) for k in stacks))
    up = dg.define_asset_job(
        UP_JOB,
        selection=dg.AssetSelection.all() - drift,
        description="Materialise the whole homelab.",
    )
    return dg.Definitions(
        jobs=[
            up,
            _reconcile_job(inventory, stacks),
            _preview_job(
                clusters + links, [_endpoint_preview_op(inventory, n) for n in inventory.endpoints]
            ),
            _teardown_job(clusters, links, workload_stacks(inventory)),
        ]
    )


def _reconcile_job(inventory: Inventory, stacks: Sequence[dg.AssetKey]):
    weights = [
        dg.AssetCheckKey(model_weights_key(name), INTACT_CHECK)
        for name, model in inventory.models.items()
        if model.source != "external"
    ]
    return dg.define_asset_job(
        RECONCILE_JOB,
        selection=dg.AssetSelection.checks_for_assets(*stacks) | dg.AssetSelection.checks(*weights),
        tags={RECONCILE_TAG: "check"},
        description="Look for drift: every stack refreshed in preview mode, every link and "
        "cluster checked, every trained model's current weights verified. Changes nothing.",
    )


def preview_op_name(key: dg.AssetKey) -> str:
    """The ``preview`` job's op of asset ``key``'s stack."""
    return f"preview_{key_slug(key)}"


def previewed_stacks(inventory: Inventory) -> dict[dg.AssetKey, tuple[str, ...]]:
    """The assets whose stacks the ``preview`` job previews, each with the clusters it
    touches: every cluster, mesh link and endpoint."""
    clusters, links = stack_specs(inventory)
    stacks = {spec.key: tuple(spec.clusters) for spec in clusters + links}
    return stacks | {endpoint_key(n): (e.cluster,) for n, e in inventory.endpoints.items()}


def _op_tags(clusters: Sequence[str]) -> dict[str, object]:
    return {CLUSTERS_TAG: ",".join(clusters), **STACK_STEP_TAGS}


def _preview_op(spec: StackSpec) -> dg.OpDefinition:
    @dg.op(
        name=preview_op_name(spec.key),
        tags=_op_tags(spec.clusters),
        description=f"pulumi preview of {spec.key.to_user_string()}'s stack.",
    )
    def _op(context: dg.OpExecutionContext, pulumi: PulumiStacks, kubernetes: KubernetesClusters):
        stack = pulumi.stack_name(spec.key.path)
        try:
            result = pulumi.preview(stack, spec.program(pulumi, kubernetes), context.log)
        except HomelabError as exc:
            raise step_failure(exc) from exc
        record_preview(context, spec.key, stack, result)

    return _op


def _destroy_op(key: dg.AssetKey, clusters: Sequence[str], after: bool) -> dg.OpDefinition:
    @dg.op(
        name=f"destroy_{key_slug(key)}",
        ins={"after": dg.In(dg.Nothing)} if after else {},
        tags=_op_tags(clusters),
        description=f"pulumi destroy of {key.to_user_string()}'s stack.",
    )
    def _op(context: dg.OpExecutionContext, pulumi: PulumiStacks):
        stack = pulumi.stack_name(key.path)
        try:
            result = pulumi.destroy(stack, context.log)
        except HomelabError as exc:
            raise step_failure(exc) from exc
        context.log_event(dg.AssetObservation(asset_key=key, metadata=result.metadata()))

    return _op


def _endpoint_preview_op(inventory: Inventory, name: str) -> dg.OpDefinition:
    endpoint = inventory.endpoints[name]
    return endpoint_preview_op(
        name,
        endpoint,
        inventory.models[endpoint.model],
        inventory.clusters[endpoint.cluster],
        inventory.mesh.export_label,
        op_name=preview_op_name(endpoint_key(name)),
        tags=_op_tags((endpoint.cluster,)),
    )


def _preview_job(
    specs: Sequence[StackSpec], endpoints: Sequence[dg.OpDefinition]
) -> dg.JobDefinition:
    previews = [*(_preview_op(s) for s in specs), *endpoints]

    @dg.job(name=PREVIEW_JOB, description="What materialising would change (pulumi preview).")
    def preview() -> None:
        for op in previews:
            op()

    return preview


def _teardown_job(
    clusters: Sequence[StackSpec],
    links: Sequence[StackSpec],
    workloads: Sequence[tuple[dg.AssetKey, tuple[str, ...]]],
) -> dg.JobDefinition:
    first = [(s.key, s.clusters) for s in links] + list(workloads)
    first_ops = {key: _destroy_op(key, on, after=False) for key, on in first}
    touching = {c.key: [key for key, on in first if set(c.clusters) & set(on)] for c in clusters}
    cluster_ops = {c.key: _destroy_op(c.key, c.clusters, bool(touching[c.key])) for c in clusters}

    @dg.job(
        name=TEARDOWN_JOB,
        description="Destroy every stack: mesh links, endpoints and the orchestrator first, "
        "then the clusters (pulumi destroy).",
    )
    def teardown() -> None:
        gone = {key: op() for key, op in first_ops.items()}
        for key, op in cluster_ops.items():
            if touching[key]:
                op(after=[gone[k] for k in touching[key]])
            else:
                op()

    return teardown
