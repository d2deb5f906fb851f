"""The invariants the asset checks judge, as plain functions of what was observed.

Each function compares what a cluster (or a mesh link) is with what the inventory says it
should be, and returns a :class:`Verdict`: whether the invariant holds, a sentence for a
person, and the observed and expected values for tools. The assets read the world through
their resources and turn verdicts into Dagster check results; nothing here talks to a
cluster, so every rule is tested on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from homelab_dagster.inventory import Cluster, Node
from homelab_dagster.twin_nodes import ObservedNode

__all__ = [
    "Verdict",
    "duration",
    "link_mirrored",
    "namespaces_present",
    "nodes_match_inventory",
    "nodes_ready",
]


def duration(seconds: float) -> str:
    """A span of time for a person: ``45 s``, ``12 min``, ``3.5 h``, ``2.0 days``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass(frozen=True)
class Verdict:
    """One invariant, judged: whether it holds, why in words, what was observed and expected."""

    passed: bool
    description: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


def nodes_ready(expected: Sequence[Node], observed: Iterable[ObservedNode]) -> Verdict:
    """Every expected node exists and is Ready."""
    live = {n.name: n for n in observed}
    missing = sorted(n.name for n in expected if n.name not in live)
    not_ready = sorted(n.name for n in expected if n.name in live and not live[n.name].ready)
    problems = [f"missing: {', '.join(missing)}"] * bool(missing)
    problems += [f"not Ready: {', '.join(not_ready)}"] * bool(not_ready)
    return Verdict(
        passed=not problems,
        description="; ".join(problems) or f"{len(expected)} nodes Ready",
        metadata={
            "expected_ready": len(expected),
            "observed_ready": len(expected) - len(missing) - len(not_ready),
            "missing": missing,
            "not_ready": not_ready,
        },
    )


def _node_problems(node: Node, found: ObservedNode) -> list[str]:
    problems = []
    wrong = sorted(k for k, v in node.labels.items() if found.labels.get(k) != v)
    if wrong:
        problems.append(f"{node.name}: labels {', '.join(wrong)} differ")
    taints = {(t.key, t.value, t.effect) for t in node.taints}
    if not taints <= set(found.taints):
        problems.append(f"{node.name}: taints {sorted(taints - set(found.taints))} missing")
    if found.gpus != node.gpus:
        problems.append(f"{node.name}: {found.gpus} GPUs, the inventory has {node.gpus}")
    return problems


def nodes_match_inventory(cluster: Cluster, observed: Iterable[ObservedNode]) -> Verdict:
    """The node count, and each node's labels, taints and GPU capacity, are the inventory's."""
    expected = cluster.expanded_nodes()
    live = {n.name: n for n in observed}
    problems = []
    if len(live) != len(expected):
        problems.append(f"{len(live)} nodes, the inventory has {len(expected)}")
    for node in expected:
        found = live.get(node.name)
        problems += [f"{node.name}: missing"] if found is None else _node_problems(node, found)
    return Verdict(
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


def namespaces_present(cluster: Cluster, live: set[str]) -> Verdict:
    """Every namespace the inventory declares exists."""
    missing = sorted(set(cluster.namespaces) - live)
    return Verdict(
        passed=not missing,
        description=f"missing: {', '.join(missing)}" if missing else "all namespaces present",
        metadata={
            "expected": sorted(cluster.namespaces),
            "observed": sorted(live & set(cluster.namespaces)),
            "missing": missing,
        },
    )


def link_mirrored(
    exported: Sequence[str], expected: Sequence[str], observed: Sequence[str]
) -> Verdict:
    """Each service the far side exports (``exported``, as ``namespace/name``) has its mirror
    on the near side (``expected`` mirror names), and no mirror is left of a service no
    longer exported. ``observed``: the mirrors found on the near side."""
    missing = sorted(set(expected) - set(observed))
    stale = sorted(set(observed) - set(expected))
    problems = [f"mirrors missing: {', '.join(missing)}"] * bool(missing)
    problems += [f"mirrors of services no longer exported: {', '.join(stale)}"] * bool(stale)
    return Verdict(
        passed=not problems,
        description="; ".join(problems)
        or f"{len(exported)} exported service(s) reachable and mirrored",
        metadata={
            "exported_services": sorted(exported),
            "expected_mirrors": sorted(expected),
            "observed_mirrors": sorted(observed),
            "missing": missing,
            "stale": stale,
        },
    )
