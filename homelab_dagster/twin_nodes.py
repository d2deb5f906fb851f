"""The twin's simulated nodes: KWOK fake nodes made from the inventory's node pools.

A fake node is an ordinary Node object with the annotation ``kwok.x-k8s.io/node: fake``; the
KWOK controller keeps it Ready and runs the pods bound to it. Its capacity (cpu, memory,
pods, ``nvidia.com/gpu``) is what the real kube-scheduler fits pods against.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from homelab_dagster.inventory import Node, Taint

__all__ = [
    "FAKE_ANNOTATION",
    "GPU_RESOURCE",
    "REAL_NODE_LABELS",
    "ObservedNode",
    "node_manifest",
    "observe",
    "observed_node",
    "reconcile",
    "wait_ready",
]

FAKE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
_MAX_PODS = "110"
# What a real node (a kubelet, `twin: real`) carries instead of `type: kwok`: workloads that
# must execute (Dagster's pods) select it.
REAL_NODE_LABELS = {"type": "real"}


def node_manifest(node: Node) -> dict[str, Any]:
    """The Node object of an inventory node, as the API takes it."""
    capacity = {"cpu": str(node.cpu), "memory": node.memory, "pods": _MAX_PODS}
    if node.gpus:
        capacity[GPU_RESOURCE] = str(node.gpus)
    labels = {
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        **node.labels,
    }
    if node.role == "control-plane":
        labels["node-role.kubernetes.io/control-plane"] = ""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "annotations": {FAKE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": labels,
        },
        "spec": {"taints": [t.manifest() for t in node.taints]},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux"},
        },
    }


@dataclass(frozen=True)
class ObservedNode:
    """A node as its API server reports it (twin or homelab alike)."""

    name: str
    ready: bool
    gpus: int
    labels: dict[str, str]
    taints: tuple[tuple[str, str, str], ...]


def observed_node(node: Any) -> ObservedNode:
    """An :class:`ObservedNode` from the Kubernetes client's ``V1Node``."""
    conditions = node.status.conditions or []
    return ObservedNode(
        name=node.metadata.name,
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        gpus=int((node.status.allocatable or {}).get(GPU_RESOURCE, "0")),
        labels=dict(node.metadata.labels or {}),
        taints=tuple((t.key, t.value or "", t.effect) for t in node.spec.taints or []),
    )


def observe(api_client: Any) -> list[ObservedNode]:
    """Every node of the cluster behind ``api_client``."""
    from kubernetes import client

    nodes = client.CoreV1Api(api_client).list_node(_request_timeout=10).items
    return [observed_node(n) for n in nodes]


def _is_fake(node: Any) -> bool:
    return (node.metadata.annotations or {}).get(FAKE_ANNOTATION) == "fake"


def reconcile(api_client: Any, nodes: list[Node], real: Iterable[str] = ()) -> str:
    """Make the cluster's fake nodes exactly ``nodes``; returns a summary of the changes.

    Missing nodes are created; existing ones get the inventory's labels, taints and capacity
    back (labels the inventory does not declare are kept: other tools may add them); fake
    nodes the inventory no longer has are deleted. Nodes that are not fake are left alone.

    ``real`` names the nodes that run as real nodes (a kubelet registers them): they are not
    created here, and a fake node of that name is deleted so that the kubelet can register.
    A node the inventory marks ``twin: real`` that runs fake now (real nodes cannot run here)
    replaces the Node a kubelet left behind.
    """
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    existing = {n.metadata.name: n for n in core.list_node(_request_timeout=10).items}
    created = updated = deleted = 0
    real = set(real)
    nodes = [n for n in nodes if n.name not in real]
    wanted = {n.name for n in nodes}
    for node in nodes:
        manifest = node_manifest(node)
        current = existing.get(node.name)
        if current is not None and node.twin == "real" and not _is_fake(current):
            core.delete_node(node.name)  # a real node's leftover: it runs fake now
            deleted += 1
            current = None
        if current is None:
            core.create_node(manifest)
            core.patch_node_status(node.name, {"status": manifest["status"]})
            created += 1
            continue
        labels = current.metadata.labels or {}
        taints = [
            Taint(key=t.key, value=t.value or "", effect=t.effect).manifest()
            for t in current.spec.taints or []
        ]
        capacity = dict(current.status.capacity or {})
        if (
            any(labels.get(k) != v for k, v in manifest["metadata"]["labels"].items())
            or taints != manifest["spec"]["taints"]
        ):
            core.patch_node(
                node.name,
                {"metadata": {"labels": manifest["metadata"]["labels"]}, "spec": manifest["spec"]},
            )
            updated += 1
        if any(capacity.get(k) != v for k, v in manifest["status"]["capacity"].items()):
            core.patch_node_status(node.name, {"status": manifest["status"]})
            updated += 1
    for name, current in existing.items():
        if _is_fake(current) and name not in wanted:
            core.delete_node(name)
            deleted += 1
    return f"{len(nodes)} nodes: {created} created, {updated} updated, {deleted} deleted"


def wait_ready(api_client: Any, *, timeout_s: float) -> bool:
    """Wait until every node is Ready (KWOK marks fake nodes Ready); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = observe(api_client)
        if nodes and all(n.ready for n in nodes):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
