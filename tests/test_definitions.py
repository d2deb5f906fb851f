"""The code location loads, with the expected keys, edges, groups and kinds."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg
import pytest

from assets import build_homelab_defs, build_inventory_defs
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings
from resources.ml import build_ml_resources
from resources.stacks import build_stack_resources


@pytest.fixture(scope="module")
def graph(project_root):
    inventory = load_inventory(project_root / "homelab.yaml").inventory
    defs = dg.Definitions.merge(
        build_inventory_defs(project_root / "homelab.yaml"),
        build_homelab_defs(inventory),
        # The ML assets need their resources bound for the graph to resolve.
        dg.Definitions(resources=build_ml_resources(Settings.from_env(), inventory)),
        dg.Definitions(resources=build_stack_resources(Settings.from_env(), inventory)),
    )
    return defs.resolve_asset_graph()


def keys(graph, prefix: str) -> set[str]:
    return {k.to_user_string() for k in graph.get_all_asset_keys() if k.path[0] == prefix}


def test_every_family_is_in_the_graph(graph):
    assert keys(graph, "cluster") == {
        f"cluster/{c}" for c in ("air", "pro", "studio", "pi", "forge")
    }
    assert keys(graph, "mesh_link") == {
        "mesh_link/studio__forge",
        "mesh_link/studio__pro",
        "mesh_link/studio__air",
        "mesh_link/pro__studio",
        "mesh_link/pi__studio",
    }
    assert keys(graph, "training_run") == {"training_run/sre-runbook"}
    assert keys(graph, "model_weights") == {
        "model_weights/sre-agent",
        "model_weights/llama-3.1-70b-instruct",
    }
    assert keys(graph, "vllm_endpoint") == {"vllm_endpoint/vllm", "vllm_endpoint/sre-agent"}
    assert keys(graph, "homelab_inventory") == {"homelab_inventory"}


def test_edges_follow_the_mission(graph):
    def parents(key: str) -> set[str]:
        node = graph.get(dg.AssetKey.from_user_string(key))
        return {k.to_user_string() for k in node.parent_keys}

    assert parents("cluster/forge") == {"homelab_inventory"}
    assert parents("mesh_link/studio__forge") == {"cluster/studio", "cluster/forge"}
    assert "cluster/forge" in parents("training_run/sre-runbook")
    assert "training_run/sre-runbook" in parents("model_weights/sre-agent")
    assert parents("vllm_endpoint/sre-agent") >= {"cluster/forge", "model_weights/sre-agent"}


def test_groups_and_kinds(graph):
    forge = graph.get(dg.AssetKey(["cluster", "forge"]))
    assert forge.group_name == "clusters"
    assert {"pulumi", "kubernetes"} <= set(forge.kinds)
    assert graph.get(dg.AssetKey(["mesh_link", "studio__forge"])).group_name == "mesh"
    assert graph.get(dg.AssetKey(["vllm_endpoint", "vllm"])).group_name == "ml"


def test_inventory_check_fails_with_the_validators_messages(tmp_path, inventory_text):
    bad = tmp_path / "homelab.yaml"
    bad.write_text(inventory_text(lambda d: d["clusters"]["pro"].update(api_port=6443)))
    defs = build_inventory_defs(bad)
    result = dg.materialize([*defs.assets, *defs.asset_checks], raise_on_error=False)
    # The asset records the file; its blocking check fails the run.
    assert not result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert "already used by cluster 'air'" in evaluation.description
    materialization = result.asset_materializations_for_node("homelab_inventory")[0]
    assert materialization.metadata["valid"].value is False


def test_inventory_asset_records_digest_and_counts(project_root):
    defs = build_inventory_defs(project_root / "homelab.yaml")
    result = dg.materialize([*defs.assets, *defs.asset_checks])
    metadata = result.asset_materializations_for_node("homelab_inventory")[0].metadata
    assert metadata["count_clusters"].value == 5 and metadata["count_gpus"].value == 6
    assert len(metadata["digest"].value) == 64
    assert result.get_asset_check_evaluations()[0].passed


def test_code_location_loads_without_heavy_imports(project_root):
    probe = (
        "import sys, homelab_dagster.definitions as d;"
        "d.defs.resolve_asset_graph();"
        "heavy = [m for m in ('torch', 'transformers', 'flytekit', 'pulumi_kubernetes')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=project_root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_dagster_definitions_validate(project_root):
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=project_root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
