"""The checks' invariants (homelab_dagster/checks.py), on observed states made up for the
purpose (no cluster).

The twin tests run the same checks against live API servers.
"""

from __future__ import annotations

import dagster as dg

from assets.clusters import build_cluster_defs
from homelab_dagster.checks import (
    link_mirrored,
    namespaces_present,
    nodes_match_inventory,
    nodes_ready,
)
from homelab_dagster.twin_nodes import ObservedNode


def observed(cluster, **changes) -> list[ObservedNode]:
    """The live nodes of a healthy ``cluster``, with ``changes`` (name -> fields) applied."""
    nodes = []
    for node in cluster.expanded_nodes():
        fields = {
            "name": node.name,
            "ready": True,
            "gpus": node.gpus,
            "labels": {**node.labels, "kubernetes.io/hostname": node.name},
            "taints": tuple((t.key, t.value, t.effect) for t in node.taints),
        } | changes.get(node.name, {})
        if fields.pop("gone", False):
            continue
        nodes.append(ObservedNode(**fields))
    return nodes


def test_a_healthy_cluster_passes_every_check(shipped_inventory):
    forge = shipped_inventory.clusters["forge"]
    assert nodes_ready(forge.expanded_nodes(), observed(forge)).passed
    assert nodes_match_inventory(forge, observed(forge)).passed
    assert namespaces_present(forge, {*forge.namespaces, "default"}).passed


def test_a_missing_or_unready_node_fails_nodes_ready(shipped_inventory):
    forge = shipped_inventory.clusters["forge"]
    live = observed(
        forge, **{"forge-inference": {"gone": True}, "forge-platform": {"ready": False}}
    )
    result = nodes_ready(forge.expanded_nodes(), live)
    assert not result.passed
    assert result.description == "missing: forge-inference; not Ready: forge-platform"
    assert result.metadata["expected_ready"] == 8
    assert result.metadata["observed_ready"] == 6


def test_labels_taints_and_gpus_are_compared_with_the_inventory(shipped_inventory):
    air, forge = shipped_inventory.clusters["air"], shipped_inventory.clusters["forge"]
    wrong_gpus = nodes_match_inventory(forge, observed(forge, **{"forge-inference": {"gpus": 1}}))
    assert not wrong_gpus.passed
    assert "forge-inference: 1 GPUs, the inventory has 2" in wrong_gpus.description
    assert wrong_gpus.metadata["observed_gpus"] == 5
    relabelled = observed(air, **{"air-platform": {"labels": {"role": "platform", "tier": "x"}}})
    assert "air-platform: labels tier differ" in nodes_match_inventory(air, relabelled).description
    untainted = observed(air, **{"air-control-plane": {"taints": ()}})
    assert "air-control-plane: taints" in nodes_match_inventory(air, untainted).description


def test_an_extra_node_changes_the_count(shipped_inventory):
    pi = shipped_inventory.clusters["pi"]
    extra = ObservedNode("pi-stranger", True, 0, {}, ())
    result = nodes_match_inventory(pi, [*observed(pi), extra])
    assert not result.passed and "4 nodes, the inventory has 3" in result.description


def test_a_missing_namespace_is_named(shipped_inventory):
    forge = shipped_inventory.clusters["forge"]
    result = namespaces_present(forge, set(forge.namespaces) - {"data-ml"})
    assert not result.passed and result.description == "missing: data-ml"
    assert result.metadata["missing"] == ["data-ml"]


def test_the_checks_are_blocking_and_run_in_the_materialisations_step(shipped_inventory):
    defs = build_cluster_defs("forge", shipped_inventory.clusters["forge"])
    (asset,) = defs.assets
    specs = {spec.name: spec for spec in asset.check_specs}
    drift = specs.pop("no_drift")  # the reconcile's: reported, not blocking
    assert not drift.blocking
    assert set(specs) == {"nodes_ready", "nodes_match_inventory", "namespaces_present"}
    assert all(spec.blocking for spec in specs.values())
    assert {spec.asset_key for spec in specs.values()} == {dg.AssetKey(["cluster", "forge"])}
    assert asset.can_subset  # the checks also run alone


def test_a_link_passes_when_every_export_has_its_mirror():
    verdict = link_mirrored(
        exported=["ml-inference/vllm"],
        expected=["ml-inference/vllm-forge"],
        observed=["ml-inference/vllm-forge"],
    )
    assert verdict.passed
    assert verdict.description == "1 exported service(s) reachable and mirrored"


def test_a_link_names_missing_and_stale_mirrors():
    verdict = link_mirrored(
        exported=["ml-inference/vllm"],
        expected=["ml-inference/vllm-forge"],
        observed=["observability/grafana-forge"],
    )
    assert not verdict.passed
    assert verdict.description == (
        "mirrors missing: ml-inference/vllm-forge; "
        "mirrors of services no longer exported: observability/grafana-forge"
    )
    assert verdict.metadata["missing"] == ["ml-inference/vllm-forge"]
    assert verdict.metadata["stale"] == ["observability/grafana-forge"]
