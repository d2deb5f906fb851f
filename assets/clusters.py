"""``cluster/<cluster>``: one Kubernetes cluster, provisioned by its own Pulumi stack.

Materialising runs ``pulumi up`` (with a refresh first, so drift made behind Pulumi's back
is repaired) on the stack ``<target>.cluster.<cluster>`` with the program of
:mod:`infra.cluster`, and records what it did and what the cluster is (docs/metadata.md).
Three blocking checks compare the live cluster with the inventory, one invariant each
(the rules are :mod:`homelab_dagster.checks`): ``nodes_ready``, ``nodes_match_inventory``
and ``namespaces_present``; ``no_drift`` (not blocking) compares the stack's state with the
cluster (:func:`assets._stack.drift_check`).
"""

from collections.abc import Iterator, Mapping

import dagster as dg

from assets._keys import INVENTORY_KEY, cluster_key
from assets._stack import (
    DRIFT_CHECK,
    STACK_STEP_TAGS,
    StackConfig,
    StackSpec,
    check_result,
    drift_check,
    drift_check_spec,
    live_record,
    provenance,
    step_failure,
)
from homelab_dagster import checks
from homelab_dagster.errors import HomelabError, KubernetesError
from homelab_dagster.inventory import Cluster, Component
from homelab_dagster.twin_nodes import ObservedNode
from infra.cluster import cluster_program, component_plan
from resources.kubernetes import KubernetesClusters
from resources.pulumi import Program, PulumiStacks

__all__ = ["build_cluster_defs", "cluster_stack"]

_CHECKS = {
    "nodes_ready": "Every node of the inventory exists and is Ready.",
    "nodes_match_inventory": "Node count, labels, taints and GPU capacity are the inventory's.",
    "namespaces_present": "Every namespace the inventory declares exists.",
}
_NODE_CHECKS = {"nodes_ready", "nodes_match_inventory"}


def cluster_stack(
    name: str, cluster: Cluster, components: Mapping[str, Component] | None = None
) -> StackSpec:
    """The stack of cluster ``name``: its key and how to build its program."""

    def program(pulumi: PulumiStacks, kubernetes: KubernetesClusters) -> Program:
        access = kubernetes.access(name)
        return cluster_program(
            name,
            cluster,
            components or {},
            cluster_identifier=f"{pulumi.target}.{name}",
            install_charts=pulumi.install_charts,
            charts_note=pulumi.charts_note,
            kubeconfig=access.kubeconfig,
            context=access.context,
        )

    return StackSpec(key=cluster_key(name), clusters=(name,), program=program)


def build_cluster_defs(
    name: str, cluster: Cluster, components: Mapping[str, Component] | None = None
) -> dg.Definitions:
    """The asset of cluster ``name`` and its checks (``components``: the inventory's)."""
    entry = _ClusterEntry(name, cluster, dict(components or {}))
    key = entry.spec.key

    @dg.multi_asset(
        name=key.to_python_identifier(),
        specs=[
            dg.AssetSpec(
                key,
                deps=[INVENTORY_KEY],
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
                skippable=True,
            )
        ],
        check_specs=[
            *(
                dg.AssetCheckSpec(check, asset=key, blocking=True, description=text)
                for check, text in _CHECKS.items()
            ),
            drift_check_spec(key),
        ],
        # Checks run in the materialisation's own step (one process, one read of the
        # cluster), and can also run alone: select only them.
        can_subset=True,
        op_tags=STACK_STEP_TAGS,
    )
    def _cluster(
        context: dg.AssetExecutionContext,
        config: StackConfig,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        nodes: list[ObservedNode] | None = None
        if key in context.selected_asset_keys:
            try:
                result, nodes = entry.provision(
                    context.log, config, pulumi, kubernetes, provenance(context)
                )
            except HomelabError as exc:
                raise step_failure(exc) from exc
            yield result
        selected = {k.name for k in context.selected_asset_check_keys}
        yield from entry.check_results(selected, kubernetes, nodes)
        if DRIFT_CHECK in selected:
            yield drift_check(entry.spec, pulumi, kubernetes, context.log)

    return dg.Definitions(assets=[_cluster])


class _ClusterEntry:
    """One inventory cluster, as its asset provisions and checks it."""

    def __init__(self, name: str, cluster: Cluster, components: dict[str, Component]) -> None:
        self.name = name
        self.cluster = cluster
        self.components = components
        self.spec = cluster_stack(name, cluster, components)

    def provision(
        self,
        log: dg.DagsterLogManager,
        config: StackConfig,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
        origin: Mapping[str, str],
    ) -> tuple[dg.MaterializeResult, list[ObservedNode]]:
        """``pulumi up`` of the cluster's stack: its materialisation (``origin``: the run's
        provenance metadata), and the nodes after it."""
        stack = pulumi.stack_name(self.spec.key.path)
        program = self.spec.program(pulumi, kubernetes)
        result = pulumi.up(stack, program, log, refresh=config.refresh)
        nodes = kubernetes.nodes(self.name)
        server = kubernetes.server(self.name)
        plans = component_plan(
            self.cluster, self.components, install=pulumi.install_charts, note=pulumi.charts_note
        )
        skipped = [p.name for p in plans if not p.install]
        log.info(  # one line (each is an event to store); the reasons are in metadata
            f"{stack}: {result.changed} change(s) in {result.duration_s:.1f} s "
            f"({result.resource_count} resources)"
            + (f"; components skipped: {', '.join(skipped)}" if skipped else "")
        )
        metadata = {
            **result.metadata(),
            "api_server": dg.MetadataValue.url(server),
            "node_count": len(nodes),
            "gpu_capacity": sum(n.gpus for n in nodes),
            "components_installed": [p.name for p in plans if p.install],
            "components_skipped": dg.MetadataValue.json(
                {p.name: p.reason for p in plans if not p.install}
            ),
            **live_record(stack, pulumi, kubernetes, log),
            **origin,
        }
        return dg.MaterializeResult(asset_key=self.spec.key, metadata=metadata), nodes

    def check_results(
        self, selected: set[str], kubernetes: KubernetesClusters, nodes: list[ObservedNode] | None
    ) -> Iterator[dg.AssetCheckResult]:
        """The ``selected`` checks, on ``nodes`` when the materialisation read them already."""
        key = self.spec.key
        try:
            if nodes is None and selected & _NODE_CHECKS:
                nodes = kubernetes.nodes(self.name)
            live = kubernetes.namespaces(self.name) if "namespaces_present" in selected else set()
        except KubernetesError as exc:
            for check in sorted(selected):
                yield check_result(key, check, checks.Verdict(False, str(exc)))
            return
        verdicts = {
            "nodes_ready": lambda: checks.nodes_ready(self.cluster.expanded_nodes(), nodes or []),
            "nodes_match_inventory": lambda: checks.nodes_match_inventory(
                self.cluster, nodes or []
            ),
            "namespaces_present": lambda: checks.namespaces_present(self.cluster, live),
        }
        for check in _CHECKS:
            if check in selected:
                yield check_result(key, check, verdicts[check]())
