"""The code location loads, with the expected keys, edges, groups and kinds."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import dagster as dg
import pytest
import yaml

from assets import build_inventory_defs
from assets.jobs import CLUSTERS_TAG, preview_op_name, previewed_stacks
from homelab_dagster.definitions import build_definitions
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings, Target
from resources.deployment import build_deployment


def settings_for(project_root, target: Target) -> Settings:
    return Settings(project_root / "homelab.yaml", target, project_root / ".homelab")


@pytest.fixture(scope="module")
def inventory(project_root):
    return load_inventory(project_root / "homelab.yaml").inventory


@pytest.fixture(scope="module")
def graph(project_root, inventory):
    defs = build_definitions(settings_for(project_root, Target.TWIN), inventory)
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
    # A link mirrors what its target exports when it runs: it follows the endpoints there
    # (found missing after a whole `homelab up`, when the link ran before the endpoints).
    assert parents("mesh_link/studio__forge") == {
        "cluster/studio",
        "cluster/forge",
        "vllm_endpoint/vllm",
        "vllm_endpoint/sre-agent",
    }
    assert parents("mesh_link/studio__pro") == {"cluster/studio", "cluster/pro"}
    assert "cluster/forge" in parents("training_run/sre-runbook")
    assert "training_run/sre-runbook" in parents("model_weights/sre-agent")
    assert parents("vllm_endpoint/sre-agent") == {"cluster/forge", "model_weights/sre-agent"}


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


def test_a_cluster_named_with_a_hyphen_gets_its_asset_link_and_ops(
    project_root, tmp_path, inventory_text
):
    # `edge-1` is a valid Kubernetes name (and the inventory's); an op name is not: Dagster's
    # own AssetKey.to_python_identifier() names the ops.
    def add_edge(data):
        edge = copy.deepcopy(data["clusters"]["pi"])
        edge["host"] = "edge-1"
        edge["network"] = {"pod_cidr": "10.120.0.0/17", "service_cidr": "10.120.128.0/20"}
        for node in edge["nodes"]:
            node["name"] = node["name"].replace("pi-", "edge-1-")
        data["clusters"]["edge-1"] = edge
        data["mesh"]["links"].append({"from": "edge-1", "to": "studio", "latency_ms": [5, 8]})

    path = tmp_path / "homelab.yaml"
    path.write_text(inventory_text(add_edge))
    defs = build_definitions(
        settings_for(project_root, Target.TWIN), load_inventory(path).inventory
    )
    graph = defs.resolve_asset_graph()
    assert {"cluster/edge-1"} <= keys(graph, "cluster")
    assert {"mesh_link/edge-1__studio"} <= keys(graph, "mesh_link")
    up = defs.resolve_job_def("up")
    assert {"cluster__edge_1", "mesh_link__edge_1__studio"} <= {n.name for n in up.nodes}
    for job in ("preview", "teardown", "reconcile"):
        defs.resolve_job_def(job)


def test_the_twin_runs_every_job_with_the_forkserver_executor(project_root, inventory):
    defs = build_definitions(settings_for(project_root, Target.TWIN), inventory)
    for name in ("up", "preview", "teardown"):
        executor = defs.resolve_job_def(name).executor_def
        assert executor.name == "multiprocess"
        config = executor.config_schema.resolve_config({}).value["config"]
        start = config["start_method"]["forkserver"]
        assert "homelab_dagster.definitions" in start["preload_modules"]


def test_teardown_destroys_links_endpoints_and_the_orchestrator_before_their_clusters(
    project_root, inventory
):
    defs = build_definitions(settings_for(project_root, Target.TWIN), inventory)
    structure = defs.resolve_job_def("teardown").graph.dependency_structure
    names = [node.name for node in defs.resolve_job_def("teardown").graph.nodes]
    after = {n: {o.node_name for o in structure.all_upstream_outputs_from_node(n)} for n in names}
    for name in inventory.endpoints:
        op = f"destroy_vllm_endpoint_{name.replace('-', '_')}"
        assert op in after and not after[op]
        assert op in after[f"destroy_cluster_{inventory.endpoints[name].cluster}"]
    assert "destroy_orchestrator" in after[f"destroy_cluster_{inventory.orchestrator.cluster}"]
    assert "destroy_mesh_link_studio__forge" in after["destroy_cluster_forge"]
    assert "destroy_orchestrator" not in after["destroy_cluster_forge"]


def test_the_homelab_runs_every_step_as_a_pod_on_the_orchestrators_nodes(project_root, inventory):
    """The executor and the instance's run launcher: where each step's pod goes is the run
    launcher's (``dagster.yaml``), which dagster-k8s merges into every step pod
    (tests/test_orchestrator.py builds those pods)."""
    settings = settings_for(project_root, Target.HOMELAB)
    defs = build_definitions(settings, inventory)
    for name in ("up", "preview", "teardown"):
        executor = defs.resolve_job_def(name).executor_def
        assert executor.name == "k8s"
        assert executor.executor_creation_fn.__module__ == "dagster_k8s.executor"
    config = (
        defs.resolve_job_def("up").executor_def.config_schema.resolve_config({}).value["config"]
    )
    assert config["job_namespace"] == inventory.orchestrator.namespace == "dagster"
    assert config["load_incluster_config"] is True
    assert config["job_image"] == "ghcr.io/homelab/homelab-dagster:0.1.0"
    launcher = yaml.safe_load(build_deployment(settings, inventory).instance_yaml)
    pod = launcher["run_launcher"]["config"]["run_k8s_config"]["pod_spec_config"]
    assert pod["nodeSelector"] == {"role": "platform"}
    other = dataclasses.replace(settings, image="registry.homelab/homelab-dagster:1")
    config = (
        build_definitions(other, inventory)
        .resolve_job_def("up")
        .executor_def.config_schema.resolve_config({})
        .value["config"]
    )
    assert config["job_image"] == "registry.homelab/homelab-dagster:1"


def test_the_preview_job_previews_every_cluster_link_and_endpoint_stack(project_root, inventory):
    """One op per stack (`homelab preview`, `homelab plan --preview`), each tagged with the
    clusters it touches (how `--env` selects them)."""
    defs = build_definitions(settings_for(project_root, Target.TWIN), inventory)
    job = defs.resolve_job_def("preview")
    ops = {node.name: node.definition for node in job.graph.nodes}
    for key, clusters in previewed_stacks(inventory).items():
        op = ops.pop(preview_op_name(key))
        assert op.tags[CLUSTERS_TAG] == ",".join(clusters), key
    assert ops == {}
    endpoint = job.graph.node_named("preview_vllm_endpoint_sre_agent").definition
    assert {"pulumi", "kubernetes", "vllm", "weights_store"} <= endpoint.required_resource_keys
    assert endpoint.tags[CLUSTERS_TAG] == "forge"


def test_an_endpoint_whose_trained_model_has_no_version_yet_is_not_previewed_and_says_why(
    project_root, inventory, object_store, twin
):
    """Before the first training, `homelab preview` cannot plan the trained model's endpoint;
    its op says so (an observation, not a failure: `up` registers the version first). The
    twin's deployment on the session twin's object store, with a weights bucket of its own."""
    settings = Settings(
        project_root / "homelab.yaml",
        Target.TWIN,
        object_store.root.parent.parent,  # <state>/twin/store
        twin_port_base=twin.api_port_base,
    )
    empty = inventory.ml.model_copy(update={"weights_bucket": "test-never-trained"})
    defs = build_definitions(settings, inventory.model_copy(update={"ml": empty}))
    result = defs.resolve_job_def("preview").execute_in_process(
        op_selection=["preview_vllm_endpoint_sre_agent"], instance=dg.DagsterInstance.ephemeral()
    )
    assert result.success
    [observed] = [
        e.event_specific_data.asset_observation
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
    ]
    assert observed.asset_key == dg.AssetKey(["vllm_endpoint", "sre-agent"])
    why = observed.metadata["not_previewed"].value
    assert why.startswith("sre-agent has no weights version yet: materialising model_weights/")


def test_step_pods_are_watched_by_a_sensor_only_where_steps_run_as_pods(project_root, inventory):
    """The ``step_pods`` sensor (sensors/steps.py) fails the stuck steps of runs nobody's CLI
    follows; it exists where steps are pods (the homelab), not where they are processes."""
    homelab = build_definitions(settings_for(project_root, Target.HOMELAB), inventory)
    sensor = homelab.resolve_sensor_def("step_pods")
    assert sensor.required_resource_keys >= {"dagster_on_kubernetes", "kubernetes"}
    twin = build_definitions(settings_for(project_root, Target.TWIN), inventory)
    names = {s.name for s in twin.sensors or ()}
    assert "run_failures" in names and "step_pods" not in names


def test_stack_steps_carry_their_pod_resources(graph):
    import json

    node = graph.get(dg.AssetKey(["cluster", "forge"]))
    config = node.assets_def.op.tags["dagster-k8s/config"]
    config = json.loads(config) if isinstance(config, str) else config
    assert config["container_config"]["resources"]["requests"]["memory"] == "768Mi"


def test_the_target_is_read_only_by_settings_and_the_configuration_root(project_root):
    found = subprocess.run(
        ["grep", "-rln", "Target\\.", "homelab_dagster", "assets", "infra", "sensors", "resources"],
        cwd=project_root,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert sorted(found) == ["homelab_dagster/settings.py", "resources/deployment.py"]


def test_an_endpoints_checks_run_alone_and_say_what_they_cannot_check(
    project_root, tmp_path, inventory, weights_store
):
    # The 70B endpoint on a fresh twin deployment: its stack was never brought up, its weights
    # are not in the store and the twin cannot fetch them. A run of its checks alone (can_subset)
    # deploys nothing and reports each check skipped, with the reason, at WARN.
    from assets import endpoint_key
    from assets.endpoints import CHECKS, FRESHNESS_CHECK, build_endpoint_defs

    settings = Settings(project_root / "homelab.yaml", Target.TWIN, tmp_path)
    endpoint = inventory.endpoints["vllm"]
    defs = build_endpoint_defs(
        "vllm",
        endpoint,
        inventory.models[endpoint.model],
        inventory.clusters[endpoint.cluster],
    )
    key = endpoint_key("vllm")
    result = dg.materialize(
        list(defs.assets or []),
        resources=build_deployment(settings, inventory).resources
        | {"weights_store": weights_store},  # a bucket of its own: the model is not in it
        selection=dg.AssetSelection.checks_for_assets(key),
        raise_on_error=False,
    )
    assert result.success
    assert result.get_asset_materialization_events() == []
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    fresh = evaluations.pop(FRESHNESS_CHECK)
    assert set(evaluations) == set(CHECKS)
    for evaluation in evaluations.values():
        assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
        assert "its serving cannot be checked here" in (evaluation.description or "")
    # No version in the store: nothing it could be behind.
    assert fresh.passed and fresh.description == "the model has no current version in the store"
