"""Each rule of the inventory, broken by exactly one change to the shipped homelab.yaml."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from homelab_dagster.errors import InventoryError
from homelab_dagster.loader import load_inventory, parse_inventory


def problems_of(text: str) -> list[str]:
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, "homelab.yaml")
    return [str(p) for p in info.value.problems]


def test_shipped_inventory_is_valid(project_root):
    loaded = load_inventory(project_root / "homelab.yaml")
    assert loaded.inventory.counts() == {
        "clusters": 5,
        "nodes": 34,
        "gpus": 6,
        "mesh_links": 5,
        "models": 2,
        "training_runs": 1,
        "endpoints": 2,
    }
    forge = loaded.inventory.clusters["forge"].expanded_nodes()
    gpu_nodes = [n for n in forge if n.gpus]
    assert [n.gpus for n in gpu_nodes] == [2, 2, 2]
    assert {n.labels["nvidia.com/gpu.product"] for n in gpu_nodes} == {"NVIDIA-A100-SXM4-40GB"}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def test_overlapping_service_cidrs_name_both_clusters_and_ranges(inventory_text):
    # The owner's real mistake: air and studio share 10.98.0.0/16.
    def edit(data):
        data["clusters"]["air"]["network"]["service_cidr"] = "10.98.0.0/16"
        data["clusters"]["studio"]["network"]["service_cidr"] = "10.98.0.0/16"

    (problem,) = problems_of(inventory_text(edit))
    assert "clusters.studio.network.service_cidr" in problem
    assert "10.98.0.0/16 of cluster 'studio'" in problem
    assert "10.98.0.0/16 of cluster 'air'" in problem


def test_pod_cidr_overlap_between_clusters(inventory_text):
    # The architecture document gives pi 10.247/16: pro's pod range in the owner's code.
    def edit(data):
        data["clusters"]["pro"]["network"]["pod_cidr"] = "10.247.0.0/16"
        data["clusters"]["pi"]["network"]["pod_cidr"] = "10.247.0.0/16"

    (problem,) = problems_of(inventory_text(edit))
    assert "'pi'" in problem and "'pro'" in problem and "10.247.0.0/16" in problem


def test_pod_range_overlapping_own_service_range(inventory_text):
    (problem,) = problems_of(inventory_text(_set("clusters.forge.network.pod_cidr", "10.4.0.0/16")))
    assert "pod_cidr 10.4.0.0/16 of cluster 'forge'" in problem
    assert "service_cidr 10.4.128.0/20 of cluster 'forge'" in problem


def test_node_port_outside_its_category(inventory_text):
    # The owner's Flyte port 30081 sits in the platform range.
    text = inventory_text(_set("clusters.forge.node_ports.flyte.port", 30081))
    (problem,) = problems_of(text)
    assert "clusters.forge.node_ports.flyte.port" in problem
    assert "30081 is outside the 'ai-ml' range 30100-30199" in problem


def test_node_port_used_twice_in_one_cluster(inventory_text):
    (problem,) = problems_of(inventory_text(_set("clusters.forge.node_ports.ollama.port", 30100)))
    assert "30100 is used twice in cluster 'forge'" in problem


def test_node_port_of_unknown_category(inventory_text):
    text = inventory_text(_set("clusters.forge.node_ports.ollama.category", "gpu"))
    (problem,) = problems_of(text)
    assert "port category 'gpu' is not in port_ranges" in problem


def test_quota_for_an_undeclared_namespace(inventory_text):
    text = inventory_text(_set("clusters.air.quotas", {"ml-training": {"pods": "10"}}))
    (problem,) = problems_of(text)
    assert "clusters.air.quotas.ml-training" in problem
    assert "quota for namespace 'ml-training', which 'air' does not declare" in problem


def test_duplicate_api_port_on_a_shared_host(inventory_text):
    (problem,) = problems_of(inventory_text(_set("clusters.pro.api_port", 6443)))
    assert "clusters.pro.api_port" in problem
    assert "already used by cluster 'air' on the same host 'mac-studio'" in problem


def test_same_api_port_on_different_hosts_is_fine(inventory_text):
    # pi and forge both use 6443, on machines of their own.
    parse_inventory(inventory_text(), "homelab.yaml")


@pytest.mark.parametrize(
    ("link", "reason"),
    [
        ({"from": "studio", "to": "mars"}, "unknown cluster 'mars'"),
        ({"from": "forge", "to": "forge"}, "from 'forge' to itself"),
        ({"from": "studio", "to": "forge"}, "duplicate mesh link studio -> forge"),
    ],
)
def test_bad_mesh_links(inventory_text, link, reason):
    (problem,) = problems_of(inventory_text(lambda d: d["mesh"]["links"].append(link)))
    assert "mesh.links[5]" in problem and reason in problem


def test_endpoint_tensor_parallel_larger_than_any_node(inventory_text):
    text = inventory_text(_set("endpoints.vllm.tensor_parallel_size", 4))
    (problem,) = problems_of(text)
    assert "endpoints.vllm.tensor_parallel_size" in problem
    assert "the one with the most, forge-inference, has 2" in problem


def test_training_run_on_a_cluster_without_gpus(inventory_text):
    (problem,) = problems_of(inventory_text(_set("training_runs.sre-runbook.cluster", "studio")))
    assert "cluster 'studio' has no GPU nodes to train on" in problem


def test_a_run_over_several_nodes_needs_the_pods_launcher(inventory_text):
    def edit(data: dict[str, Any]) -> None:
        data["training_runs"]["sre-runbook"]["nodes"] = 2
        data.setdefault("ml", {})["launcher"] = "flyte"

    (problem,) = problems_of(inventory_text(edit))
    assert "training_runs.sre-runbook.nodes" in problem
    assert "ml.launcher 'flyte' trains in one pod" in problem
    pods = inventory_text(_set("training_runs.sre-runbook.nodes", 2))
    assert parse_inventory(pods, "homelab.yaml").training_runs["sre-runbook"].nodes == 2


@pytest.mark.parametrize("family", ["training_runs.sre-runbook", "endpoints.vllm"])
def test_unknown_model(inventory_text, family):
    (problem,) = problems_of(inventory_text(_set(f"{family}.model", "gpt-5")))
    assert f"{family}.model" in problem and "unknown model 'gpt-5'" in problem


def test_unknown_key_is_an_error_with_its_line_and_a_suggestion(inventory_text):
    text = inventory_text(_set("clusters.air.network.pod_cdir", "10.9.0.0/16"))
    (problem,) = problems_of(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "pod_cdir" in t)
    assert problem.startswith(f"homelab.yaml:{line}: clusters.air.network.pod_cdir:")
    assert "unknown key 'pod_cdir' (did you mean 'pod_cidr'?)" in problem


def test_wrong_type_names_the_field_and_value(inventory_text):
    (problem,) = problems_of(inventory_text(_set("clusters.forge.nodes.2.cpu", "lots")))
    assert "clusters.forge.nodes[2].cpu" in problem and "'lots'" in problem


def test_invalid_label_value(inventory_text):
    text = inventory_text(_set("clusters.air.nodes.1.labels", {"tier": "not valid!"}))
    (problem,) = problems_of(text)
    assert "clusters.air.nodes[1].labels" in problem and "'not valid!'" in problem


def test_every_problem_is_reported_at_once(inventory_text):
    def edit(data):
        data["clusters"]["pro"]["api_port"] = 6443
        data["endpoints"]["vllm"]["tensor_parallel_size"] = 8
        data["mesh"]["links"].append({"from": "pi", "to": "pi"})

    assert len(problems_of(inventory_text(edit))) == 3


def test_not_yaml_and_missing_file(tmp_path):
    (problem,) = problems_of("clusters: [unclosed")
    assert "not valid YAML" in problem
    with pytest.raises(InventoryError, match="cannot read the inventory"):
        load_inventory(tmp_path / "absent.yaml")


def test_real_twin_nodes_are_capped_and_the_rule_says_why(inventory_text):
    def edit(data):
        data["clusters"]["air"]["nodes"][1]["twin"] = "real"  # air-platform

    (problem,) = problems_of(inventory_text(edit))  # at the fourth, in the file's order
    assert "clusters.studio.nodes[3].twin" in problem  # (inventory_text sorts the clusters)
    assert "at most 3 nodes may be real on the twin" in problem
    assert "kubelet and containerd" in problem


def test_a_cluster_has_at_most_two_real_nodes(inventory_text):
    def edit(data):
        data["clusters"]["studio"]["nodes"][3]["twin"] = "fake"  # studio-platform-a
        data["clusters"]["forge"]["nodes"][3]["twin"] = "real"  # forge-training-secondary

    (problem,) = problems_of(inventory_text(edit))
    assert "clusters.forge.nodes[4].twin" in problem
    assert "'forge' would have 3" in problem and "port block" in problem


def test_twin_is_fake_or_real(inventory_text):
    (problem,) = problems_of(inventory_text(_set("clusters.air.nodes.1.twin", "virtual")))
    assert "clusters.air.nodes[1].twin" in problem


def test_the_shipped_inventory_makes_forges_serving_and_training_nodes_and_studio_platform_real(
    project_root,
):
    """Forge's inference node serves vLLM, its primary training node trains; a Studio platform
    node runs Dagster's pods."""
    inventory = load_inventory(project_root / "homelab.yaml").inventory
    real = [
        n.name for c in inventory.clusters.values() for n in c.expanded_nodes() if n.twin == "real"
    ]
    assert real == ["studio-platform-a", "forge-training-primary", "forge-inference"]


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("orchestrator.cluster", "mars", "orchestrator.cluster: unknown cluster 'mars'"),
        (
            "orchestrator.node_role",
            "gpu-inference",
            "orchestrator.node_role: cluster 'studio' has no node with role 'gpu-inference'",
        ),
    ],
)
def test_the_orchestrator_must_have_somewhere_to_run(inventory_text, path, value, reason):
    (problem,) = problems_of(inventory_text(_set(path, value)))
    assert reason in problem
