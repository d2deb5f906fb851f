"""Cluster and mesh link assets against the twin: real Pulumi updates on real API servers.

The acceptance of issue 4: provisioning, the no-op, drift and its repair, parallel stacks,
a working (then broken) mesh link, and input Pulumi rejects.
"""

from __future__ import annotations

import base64
import json
import logging
import time

import dagster as dg
import pytest
from kubernetes import client

from assets.clusters import build_cluster_defs, cluster_stack
from assets.mesh import build_mesh_link_defs
from homelab_dagster.inventory import Inventory
from homelab_dagster.settings import Settings, Target
from resources.deployment import build_deployment

pytestmark = [pytest.mark.twin, pytest.mark.slow]


@pytest.fixture(scope="module")
def infra(twin, shipped_inventory, tmp_path_factory):
    """forge and studio running, and the twin target's resources over their state dir."""
    twin.up(["forge", "studio"])
    settings = Settings(
        twin.root.parent / "homelab.yaml",
        Target.TWIN,
        twin.root.parent,
        twin_port_base=twin.api_port_base,
    )
    return build_deployment(settings, shipped_inventory).resources


def materialize(defs: dg.Definitions, resources, **kwargs) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        list(defs.assets or []), resources=resources, raise_on_error=False, **kwargs
    )


def cluster_defs(inventory: Inventory, name: str, cluster=None) -> dg.Definitions:
    return build_cluster_defs(name, cluster or inventory.clusters[name], inventory.components)


def metadata_of(result: dg.ExecuteInProcessResult, key: str) -> dict:
    (materialization,) = result.asset_materializations_for_node(key.replace("/", "__"))
    return {k: v.value for k, v in materialization.metadata.items()}


def failure_of(result: dg.ExecuteInProcessResult) -> str:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.step_failure_data.error.message


def checks_of(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_forge_is_provisioned_then_a_second_run_changes_nothing(infra, twin, shipped_inventory):
    forge = shipped_inventory.clusters["forge"]
    defs = cluster_defs(shipped_inventory, "forge")
    first = materialize(defs, infra)
    assert first.success, failure_of(first)
    meta = metadata_of(first, "cluster/forge")
    assert meta["pulumi_changes"]["create"] >= len(forge.namespaces) + len(forge.expanded_nodes())
    assert meta["node_count"] == 8 and meta["gpu_capacity"] == 6
    assert meta["api_server"] == f"https://127.0.0.1:{twin.api_port('forge')}"
    assert set(meta["components_skipped"]) == set(forge.components)
    assert all(
        checks_of(first)[c].passed
        for c in ("nodes_ready", "nodes_match_inventory", "namespaces_present")
    )

    core = client.CoreV1Api(twin.client("forge"))
    live = {n.metadata.name for n in core.list_namespace().items}
    assert set(forge.namespaces) <= live
    node = core.read_node("forge-inference")
    assert node.metadata.labels["role"] == "inference"
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    # Pulumi patched the labels (server-side apply) without owning the node.
    managers = {m.manager for m in node.metadata.managed_fields}
    assert any(m.startswith("pulumi") for m in managers), managers

    second = materialize(defs, infra)
    again = metadata_of(second, "cluster/forge")
    assert again["pulumi_changed"] == 0, again["pulumi_changes"]
    assert again["pulumi_resource_count"] == meta["pulumi_resource_count"]
    assert again["pulumi_duration_s"] < meta["pulumi_duration_s"]


def test_a_namespace_deleted_behind_pulumis_back_is_drift_then_restored(
    infra, twin, shipped_inventory
):
    defs = cluster_defs(shipped_inventory, "forge")
    assert materialize(defs, infra).success
    core = client.CoreV1Api(twin.client("forge"))
    core.delete_namespace("data-ml")
    _wait_gone(core, "data-ml")

    pulumi, kubernetes = infra["pulumi"], infra["kubernetes"]
    spec = cluster_stack("forge", shipped_inventory.clusters["forge"], shipped_inventory.components)
    program = spec.program(pulumi, kubernetes)
    drift = pulumi.refresh(
        "twin.cluster.forge", program, logging.getLogger("test"), preview_only=True
    )
    assert drift.changed == 1, drift.changes
    (step,) = [s for s in drift.steps if s.changes and not s.type.startswith("pulumi:")]
    assert step.name == "namespace-data-ml" and step.op == "delete"

    repaired = materialize(defs, infra)
    assert repaired.success
    assert metadata_of(repaired, "cluster/forge")["pulumi_changes"].get("create") == 1
    assert "data-ml" in {n.metadata.name for n in core.list_namespace().items}
    assert checks_of(repaired)["namespaces_present"].passed


def _wait_gone(core: client.CoreV1Api, namespace: str) -> None:
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.5)
    raise AssertionError(f"namespace {namespace} was not deleted")


def test_studio_reaches_forges_exported_services_until_the_token_is_deleted(
    infra, twin, shipped_inventory, request
):
    for name in ("forge", "studio"):
        assert materialize(cluster_defs(shipped_inventory, name), infra).success
    forge = client.CoreV1Api(twin.client("forge"))
    studio = client.CoreV1Api(twin.client("studio"))
    export = {shipped_inventory.mesh.export_label: "true"}
    # An exported Service of the test's own: named like no endpoint (the twin is shared with
    # the later modules, whose endpoint `vllm` would find a Service of that name not its own),
    # and deleted afterwards.
    forge.create_namespaced_service(
        "ml-inference",
        {
            "metadata": {"name": "exported-probe", "labels": export},
            "spec": {"ports": [{"name": "http", "port": 8000}]},
        },
    )
    request.addfinalizer(lambda: forge.delete_namespaced_service("exported-probe", "ml-inference"))
    link = next(lk for lk in shipped_inventory.mesh.links if lk.key == "studio__forge")
    defs = build_mesh_link_defs(
        link, shipped_inventory.mesh, tuple(shipped_inventory.clusters["studio"].namespaces)
    )
    linked = materialize(defs, infra)
    assert linked.success, failure_of(linked)
    meta = metadata_of(linked, "mesh_link/studio__forge")
    assert meta["mirrored_services"] == ["ml-inference/exported-probe-forge"]
    mirror = studio.read_namespaced_service("exported-probe-forge", "ml-inference")
    assert mirror.metadata.labels["mirror.linkerd.io/cluster-name"] == "forge"
    assert [p.port for p in mirror.spec.ports] == [8000]
    check = checks_of(linked)["link_works"]
    assert check.passed, check.description
    assert check.metadata["exported_services"].value == ["ml-inference/exported-probe"]
    # The token (and so the kubeconfig holding it) is in no metadata and no log line.
    secret = forge.read_namespaced_secret("mesh-link-studio-token", "linkerd-multicluster")
    token = base64.b64decode(secret.data["token"]).decode()
    assert token not in json.dumps(meta, default=str)
    assert not [e for e in linked.all_events if token in (e.message or "")]

    forge.delete_namespaced_secret("mesh-link-studio-token", "linkerd-multicluster")
    # The API server forgets a token it authenticated within seconds (its token cache).
    deadline = time.monotonic() + 60
    while True:
        broken = checks_of(
            dg.materialize(
                list(defs.assets or []),
                resources=infra,
                selection=dg.AssetSelection.checks(
                    dg.AssetCheckKey(defs.assets[0].key, "link_works")
                ),
                raise_on_error=False,
            )
        )["link_works"]
        if not broken.passed or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not broken.passed
    assert "mesh link studio -> forge is broken" in broken.description
    assert "401" in broken.description and "token was deleted" in broken.description

    healed = materialize(defs, infra)  # a new token, new credentials
    assert healed.success and checks_of(healed)["link_works"].passed


def test_input_pulumi_rejects_fails_with_its_reason_and_leaves_the_stack_usable(
    infra, twin, shipped_inventory
):
    forge = shipped_inventory.clusters["forge"]
    pools = list(forge.nodes)
    pools[0] = pools[0].model_copy(
        update={"labels": {**pools[0].labels, "tier": "not a valid value!"}}
    )
    bad = forge.model_copy(update={"nodes": pools})
    failed = materialize(cluster_defs(shipped_inventory, "forge", bad), infra)
    assert not failed.success
    message = failure_of(failed)
    assert "pulumi up of stack twin.cluster.forge failed" in message
    assert "not a valid value!" in message and "Invalid value" in message

    pulumi = infra["pulumi"]
    assert pulumi.locks("twin.cluster.forge") == []
    (checkpoint,) = (pulumi.root / "backend" / ".pulumi" / "stacks").rglob(
        "twin.cluster.forge.json"
    )
    latest = json.loads(checkpoint.read_text())["checkpoint"]["latest"]
    assert not latest.get("pending_operations")
    good = materialize(cluster_defs(shipped_inventory, "forge"), infra)
    assert good.success
    assert checks_of(good)["nodes_match_inventory"].passed
