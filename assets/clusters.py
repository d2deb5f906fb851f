"""``cluster/<cluster>``: one Kubernetes cluster, provisioned by its own Pulumi stack.

Materialising runs ``pulumi up`` (with a refresh first, so drift made behind Pulumi's back
is repaired) on the stack ``<target>.cluster.<cluster>`` with the program of
:mod:`infra.cluster`, and records what it did and what the cluster is (docs/metadata.md).
Three blocking checks compare the live cluster with the inventory, one invariant each:
``nodes_ready``, ``nodes_match_inventory`` and ``namespaces_present``.
"""

from collections.abc import Iterator, Mapping

import dagster as dg

from assets._keys import INVENTORY_KEY, cluster_key
from assets.stacks import StackConfig, StackSpec, fail
from homelab_dagster.errors import HomelabError, KubernetesError
from homelab_dagster.inventory import Cluster, Component, Node
from resources.kubernetes import KubernetesClusters, ObservedNode
from resources.pulumi import Program, PulumiStacks

__all__ = [
    "build_cluster_defs",
    "cluster_stack",
    "namespaces_present",
    "nodes_match_inventory",
    "nodes_ready",
]

_NODE_CHECKS = {"nodes_ready", "nodes_match_inventory"}


def cluster_stack(
    name: str, cluster: Cluster, components: Mapping[str, Component] | None = None
) -> StackSpec:
    """The stack of cluster ``name``: its key and how to build its program."""

    def program(pulumi: PulumiStacks, kubernetes: KubernetesClusters) -> Program:
        from infra.cluster import cluster_program

        access = kubernetes.access(name)
        return cluster_program(
            name,
            cluster,
            components or {},
            target=pulumi.target,
            kubeconfig=access.kubeconfig,
            context=access.context,
        )

    return StackSpec(key=cluster_key(name), clusters=(name,), program=program)


def build_cluster_defs(
    name: str, cluster: Cluster, components: Mapping[str, Component] | None = None
) -> dg.Definitions:
    """The asset of cluster ``name`` and its checks (``components``: the inventory's)."""
    spec = cluster_stack(name, cluster, components)
    key = spec.key
    expected = cluster.expanded_nodes()

    @dg.multi_asset(
        name="__".join(key.path),
        specs=[
            dg.AssetSpec(
                key,
                deps=[INVENTORY_KEY],
                group_name="clusters",
                kinds={"pulumi", "kubernetes"},
                description=f"{name}: {cluster.purpose} ({cluster.distribution.value}, "
                f"{len(expected)} nodes).",
                metadata={
                    "distribution": cluster.distribution.value,
                    "kubernetes_version": cluster.kubernetes_version,
                    "nodes": len(expected),
                    "gpus": cluster.gpu_total(),
                },
                skippable=True,
            )
        ],
        check_specs=[
            dg.AssetCheckSpec(
                "nodes_ready",
                asset=key,
                blocking=True,
                description="Every node of the inventory exists and is Ready.",
            ),
            dg.AssetCheckSpec(
                "nodes_match_inventory",
                asset=key,
                blocking=True,
                description="Node count, labels, taints and GPU capacity are the inventory's.",
            ),
            dg.AssetCheckSpec(
                "namespaces_present",
                asset=key,
                blocking=True,
                description="Every namespace the inventory declares exists.",
            ),
        ],
        # Checks run in the materialisation's own step (one process, one read of the
        # cluster), and can also run alone: select only them.
        can_subset=True,
    )
    def _cluster(
        context: dg.AssetExecutionContext,
        config: StackConfig,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        nodes: list[ObservedNode] | None = None
        if key in context.selected_asset_keys:
            result, nodes = _provision(context, config, pulumi, kubernetes)
            yield result
        yield from _checks(context, kubernetes, nodes)

    def _provision(
        context: dg.AssetExecutionContext,
        config: StackConfig,
        pulumi: PulumiStacks,
        kubernetes: KubernetesClusters,
    ) -> tuple[dg.MaterializeResult, list[ObservedNode]]:
        from infra.cluster import component_plan

        stack = pulumi.stack_name(key.path)
        try:
            program = spec.program(pulumi, kubernetes)
            result = pulumi.up(stack, program, context.log, refresh=config.refresh)
            nodes = kubernetes.nodes(name)
            server = kubernetes.server(name)
        except HomelabError as exc:
            raise fail(exc) from exc
        plans = component_plan(cluster, components or {}, pulumi.target)
        skipped = [p.name for p in plans if not p.install]
        context.log.info(  # one line (each is an event to store); the reasons are in metadata
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
        }
        return dg.MaterializeResult(asset_key=key, metadata=metadata), nodes

    def _checks(
        context: dg.AssetExecutionContext,
        kubernetes: KubernetesClusters,
        nodes: list[ObservedNode] | None,
    ) -> Iterator[dg.AssetCheckResult]:
        selected = {k.name for k in context.selected_asset_check_keys}
        try:
            if nodes is None and selected & _NODE_CHECKS:
                nodes = kubernetes.nodes(name)
            namespaces = kubernetes.namespaces(name) if "namespaces_present" in selected else set()
        except KubernetesError as exc:
            for check in sorted(selected):
                yield dg.AssetCheckResult(
                    asset_key=key, check_name=check, passed=False, description=str(exc)
                )
            return
        if "nodes_ready" in selected:
            yield nodes_ready(expected, nodes or [])
        if "nodes_match_inventory" in selected:
            yield nodes_match_inventory(cluster, nodes or [])
        if "namespaces_present" in selected:
            yield namespaces_present(cluster, namespaces)

    return dg.Definitions(assets=[_cluster])


def nodes_ready(expected: list[Node], observed: list[ObservedNode]) -> dg.AssetCheckResult:
    """Every expected node exists and is Ready."""
    live = {n.name: n for n in observed}
    missing = sorted(n.name for n in expected if n.name not in live)
    not_ready = sorted(n.name for n in expected if n.name in live and not live[n.name].ready)
    problems = [f"missing: {', '.join(missing)}"] * bool(missing)
    problems += [f"not Ready: {', '.join(not_ready)}"] * bool(not_ready)
    return dg.AssetCheckResult(
        check_name="nodes_ready",
        passed=not problems,
        description="; ".join(problems) or f"{len(expected)} nodes Ready",
        metadata={
            "expected_ready": len(expected),
            "observed_ready": len(expected) - len(missing) - len(not_ready),
            "missing": missing,
            "not_ready": not_ready,
        },
    )


def nodes_match_inventory(cluster: Cluster, observed: list[ObservedNode]) -> dg.AssetCheckResult:
    """The node count, and each node's labels, taints and GPU capacity, are the inventory's."""
    expected = cluster.expanded_nodes()
    live = {n.name: n for n in observed}
    problems = []
    if len(live) != len(expected):
        problems.append(f"{len(live)} nodes, the inventory has {len(expected)}")
    for node in expected:
        found = live.get(node.name)
        if found is None:
            problems.append(f"{node.name}: missing")
            continue
        wrong = sorted(k for k, v in node.labels.items() if found.labels.get(k) != v)
        if wrong:
            problems.append(f"{node.name}: labels {', '.join(wrong)} differ")
        taints = {(t.key, t.value, t.effect) for t in node.taints}
        if not taints <= set(found.taints):
            problems.append(f"{node.name}: taints {sorted(taints - set(found.taints))} missing")
        if found.gpus != node.gpus:
            problems.append(f"{node.name}: {found.gpus} GPUs, the inventory has {node.gpus}")
    return dg.AssetCheckResult(
        check_name="nodes_match_inventory",
        passed=not problems,
        description="; ".join(problems) or "nodes match the inventory",
        metadata={
            "expected_nodes": len(expected),
            "observed_nodes": len(live),
            "expected_gpus": cluster.gpu_total(),
            "observed_gpus": sum(n.gpus for n in live.values()),
            "problems": problems,
        },
    )


def namespaces_present(cluster: Cluster, live: set[str]) -> dg.AssetCheckResult:
    """Every namespace the inventory declares exists."""
    missing = sorted(set(cluster.namespaces) - live)
    return dg.AssetCheckResult(
        check_name="namespaces_present",
        passed=not missing,
        description=f"missing: {', '.join(missing)}" if missing else "all namespaces present",
        metadata={
            "expected": sorted(cluster.namespaces),
            "observed": sorted(live & set(cluster.namespaces)),
            "missing": missing,
        },
    )
