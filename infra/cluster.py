"""The Pulumi program of a cluster stack (``<target>.cluster.<name>``).

It declares a cluster's base state, from its inventory entry:

- the namespaces the inventory lists;
- each node's labels and taints, as server-side apply patches (``NodePatch``): Pulumi owns
  those fields only, never the Node objects (the distribution, or the twin, makes them),
  and a teardown leaves them in place (``retain_on_delete``);
- on GPU clusters, a PriorityClass for GPU work;
- a ResourceQuota in each namespace the inventory gives ``quotas`` for;
- the third-party components as Helm releases, where the deployment can reach chart
  repositories (the homelab; the twin cannot). Where it cannot, they are skipped, and
  :func:`component_plan` says so (the asset records each skipped component and why).

:func:`cluster_program` returns a zero-argument function: the inline program.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from homelab_dagster.inventory import Cluster, Component, Node

__all__ = [
    "GPU_PRIORITY_CLASS",
    "MANAGED_BY",
    "QUOTA_NAME",
    "TAKE_BACK",
    "ComponentPlan",
    "cluster_program",
    "component_plan",
]

GPU_PRIORITY_CLASS = "gpu-workloads"
QUOTA_NAME = "homelab-quota"
MANAGED_BY = {"app.kubernetes.io/managed-by": "homelab-dagster"}
TAKE_BACK = {"pulumi.com/patchForce": "true"}
"""Annotations of every object a stack applies: Pulumi takes the fields it applies even where
another field manager set them (kubeadm, k3s, the twin's node maker, a person's kubectl), so a
repair puts drift back instead of failing on a server-side apply conflict. The inventory is the
source of truth for them."""


@dataclass(frozen=True)
class ComponentPlan:
    """What the stack does with one third-party component in this deployment."""

    name: str
    chart: str
    version: str
    repository: str
    namespace: str
    install: bool
    reason: str = ""


def component_plan(
    cluster: Cluster, components: Mapping[str, Component], *, install: bool, note: str = ""
) -> list[ComponentPlan]:
    """Each of ``cluster``'s components: installed, or (``install`` False) skipped with the
    deployment's ``note`` and the chart repository as the reason."""
    return [
        ComponentPlan(
            name=name,
            chart=components[name].chart,
            version=components[name].version,
            repository=components[name].repository,
            namespace=components[name].namespace,
            install=install,
            reason="" if install else f"{note} (chart repository {components[name].repository})",
        )
        for name in cluster.components
    ]


def _node_patch_args(node: Node) -> tuple[dict[str, object], dict[str, object] | None]:
    """(metadata, spec) of a node's patch: its labels, and its taints when it declares some.

    Taints are one atomic list in the Node API: a node without declared taints is left
    alone rather than having its list claimed (and emptied).
    """
    metadata = {"name": node.name, "labels": dict(node.labels), "annotations": dict(TAKE_BACK)}
    if not node.taints:
        return metadata, None
    return metadata, {"taints": [t.manifest() for t in node.taints]}


def cluster_program(
    name: str,
    cluster: Cluster,
    components: Mapping[str, Component],
    *,
    cluster_identifier: str,
    install_charts: bool,
    charts_note: str = "",
    kubeconfig: str,
    context: str,
) -> Callable[[], None]:
    """The inline program of cluster ``name``, reached through ``kubeconfig``/``context``.

    ``cluster_identifier``: the provider's identity of the cluster (the same whatever file
    reaches it); ``install_charts``: whether the components' Helm releases are declared
    (where chart repositories are reachable), else each is skipped with ``charts_note``.
    """
    plans = component_plan(cluster, components, install=install_charts, note=charts_note)

    def program() -> None:
        import pulumi_kubernetes as k8s

        provider = k8s.Provider(
            name,
            kubeconfig=kubeconfig,
            context=context,
            # The cluster is the same whatever file reaches it: never replace on a new path.
            cluster_identifier=cluster_identifier,
            enable_server_side_apply=True,
        )
        namespaces = _namespaces(cluster, provider)
        _node_patches(cluster, provider)
        _gpu_priority_class(cluster, provider)
        _quotas(cluster, provider, namespaces)
        _releases(plans, components, provider, namespaces)
        _exports(cluster, plans)

    return program


def _namespaces(cluster: Cluster, provider: Any) -> dict[str, Any]:
    import pulumi
    import pulumi_kubernetes as k8s

    opts = pulumi.ResourceOptions(provider=provider)
    return {
        ns: k8s.core.v1.Namespace(
            f"namespace-{ns}",
            metadata={"name": ns, "labels": MANAGED_BY, "annotations": TAKE_BACK},
            opts=opts,
        )
        for ns in cluster.namespaces
    }


def _node_patches(cluster: Cluster, provider: Any) -> None:
    import pulumi
    import pulumi_kubernetes as k8s

    for node in cluster.expanded_nodes():
        metadata, spec = _node_patch_args(node)
        # Retained on delete: tearing the stack down must not strip the nodes' identity
        # (their role and GPU labels are what every workload is scheduled by).
        k8s.core.v1.NodePatch(
            f"node-{node.name}",
            metadata=metadata,
            spec=spec,
            opts=pulumi.ResourceOptions(provider=provider, retain_on_delete=True),
        )


def _gpu_priority_class(cluster: Cluster, provider: Any) -> None:
    import pulumi
    import pulumi_kubernetes as k8s

    if cluster.gpu_total():
        k8s.scheduling.v1.PriorityClass(
            "gpu-priority",
            metadata={"name": GPU_PRIORITY_CLASS, "labels": MANAGED_BY, "annotations": TAKE_BACK},
            value=100000,
            global_default=False,
            preemption_policy="PreemptLowerPriority",
            description="GPU training and inference on this cluster.",
            opts=pulumi.ResourceOptions(provider=provider),
        )


def _quotas(cluster: Cluster, provider: Any, namespaces: Mapping[str, Any]) -> None:
    import pulumi
    import pulumi_kubernetes as k8s

    for ns, hard in cluster.quotas.items():
        k8s.core.v1.ResourceQuota(
            f"quota-{ns}",
            metadata={
                "name": QUOTA_NAME,
                "namespace": ns,
                "labels": MANAGED_BY,
                "annotations": TAKE_BACK,
            },
            spec={"hard": dict(hard)},
            opts=pulumi.ResourceOptions(provider=provider, depends_on=[namespaces[ns]]),
        )


def _releases(
    plans: list[ComponentPlan],
    components: Mapping[str, Component],
    provider: Any,
    namespaces: Mapping[str, Any],
) -> None:
    """The components to install as Helm releases, in the inventory's order, one after the
    other (CRDs before what uses them)."""
    import pulumi
    import pulumi_kubernetes as k8s

    previous: list[pulumi.Resource] = []
    for plan in (p for p in plans if p.install):
        spec = components[plan.name]
        owner = namespaces.get(plan.namespace)
        previous = [
            k8s.helm.v3.Release(
                f"component-{plan.name}",
                name=plan.name,
                chart=spec.chart,
                version=spec.version,
                namespace=spec.namespace,
                create_namespace=owner is None,
                repository_opts={"repo": spec.repository},
                values=dict(spec.values),
                opts=pulumi.ResourceOptions(
                    provider=provider,
                    depends_on=[*previous, *([owner] if owner is not None else [])],
                ),
            )
        ]


def _exports(cluster: Cluster, plans: list[ComponentPlan]) -> None:
    import pulumi

    pulumi.export("namespaces", sorted(cluster.namespaces))
    pulumi.export("nodes", [n.name for n in cluster.expanded_nodes()])
    pulumi.export("gpu_priority_class", GPU_PRIORITY_CLASS if cluster.gpu_total() else None)
    pulumi.export("quotas", {ns: dict(hard) for ns, hard in cluster.quotas.items()})
    pulumi.export("components", {p.name: "installed" if p.install else "skipped" for p in plans})
