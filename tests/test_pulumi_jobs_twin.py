"""The ``preview`` and ``teardown`` jobs against the twin, on pro and the link pro -> studio
(clusters no other test of this suite changes)."""

from __future__ import annotations

import dagster as dg
import pytest
from kubernetes import client

from assets.clusters import build_cluster_defs
from assets.jobs import build_jobs
from assets.mesh import build_mesh_link_defs
from homelab_dagster.settings import Settings, Target
from resources.deployment import build_deployment

pytestmark = [pytest.mark.twin, pytest.mark.slow]


@pytest.fixture(scope="module")
def infra(twin, shipped_inventory):
    twin.up(["pro", "studio"])
    settings = Settings(
        twin.root.parent / "homelab.yaml",
        Target.TWIN,
        twin.root.parent,
        twin_port_base=twin.api_port_base,
    )
    resources = build_deployment(settings, shipped_inventory).resources
    link = next(lk for lk in shipped_inventory.mesh.links if lk.key == "pro__studio")
    for defs in (
        build_cluster_defs("pro", shipped_inventory.clusters["pro"], shipped_inventory.components),
        build_cluster_defs(
            "studio", shipped_inventory.clusters["studio"], shipped_inventory.components
        ),
        build_mesh_link_defs(link, shipped_inventory.mesh, ("linkerd-multicluster",)),
    ):
        assert dg.materialize(list(defs.assets or []), resources=resources).success
    return resources


def observations(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.metadata.items()}
        for e in (
            ev.event_specific_data.asset_observation
            for ev in result.all_events
            if ev.event_type_value == "ASSET_OBSERVATION"
        )
    }


def test_preview_shows_the_plan_and_changes_nothing(infra, twin, shipped_inventory):
    pro = shipped_inventory.clusters["pro"]
    wider = pro.model_copy(update={"namespaces": [*pro.namespaces, "scratch"]})
    inventory = shipped_inventory.model_copy(
        update={"clusters": {**shipped_inventory.clusters, "pro": wider}}
    )
    defs = dg.Definitions.merge(build_jobs(inventory), dg.Definitions(resources=infra))
    result = defs.resolve_job_def("preview").execute_in_process(
        op_selection=["preview_cluster_pro"]
    )
    assert result.success
    plan = observations(result)["cluster/pro"]
    assert plan["pulumi_operation"] == "preview"
    assert plan["pulumi_changed"] == 1 and plan["pulumi_changes"]["create"] == 1
    assert "| create | `kubernetes:core/v1:Namespace` | namespace-scratch |" in plan["pulumi_plan"]
    live = {n.metadata.name for n in client.CoreV1Api(twin.client("pro")).list_namespace().items}
    assert "scratch" not in live


def test_teardown_destroys_links_before_clusters_and_keeps_node_labels(
    infra, twin, shipped_inventory
):
    inv = shipped_inventory
    defs = dg.Definitions.merge(build_jobs(inv), dg.Definitions(resources=infra))
    job = defs.resolve_job_def("teardown")
    result = job.execute_in_process(
        op_selection=["destroy_mesh_link_pro__studio", "destroy_cluster_pro"]
    )
    assert result.success
    finished = [e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"]
    assert finished == ["destroy_mesh_link_pro__studio", "destroy_cluster_pro"]
    gone = observations(result)
    assert gone["cluster/pro"]["pulumi_operation"] == "destroy"
    assert gone["cluster/pro"]["pulumi_changes"]["delete"] >= len(inv.clusters["pro"].namespaces)

    pro = client.CoreV1Api(twin.client("pro"))
    live = {n.metadata.name: n.status.phase for n in pro.list_namespace().items}
    assert not [ns for ns in inv.clusters["pro"].namespaces if live.get(ns) == "Active"]
    assert pro.read_node("pro-data").metadata.labels["tier"] == "data"  # retained
    studio = client.RbacAuthorizationV1Api(twin.client("studio"))
    bindings = {b.metadata.name for b in studio.list_cluster_role_binding().items}
    assert "mesh-link-pro-reader" not in bindings
    assert infra["pulumi"].outputs("twin.cluster.pro") == {}
