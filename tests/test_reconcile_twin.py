"""The reconcile on the twin: real Pulumi refreshes of real API servers, a real Dagster
instance (temporary), the code location's own jobs, schedule and sensors.

The acceptance of issue 12: a label changed behind Pulumi's back is found by the reconcile
(the check fails, naming the resource), repaired by the repair sensor's run, and both show
in the asset's history; ``homelab status`` shows the commit the repair applied. A stack
that fails three times in a row is stalled while the other stacks keep reconciling.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import dagster as dg
import pytest
from kubernetes import client

from assets._stack import COMMIT_TAG
from assets.graph import build_homelab_defs
from assets.jobs import RECONCILE_TAG
from homelab_dagster.cli.status import collect
from homelab_dagster.definitions import build_definitions
from homelab_dagster.settings import Settings, Target
from resources.deployment import build_deployment
from resources.kubernetes import KubernetesClusters
from sensors.failures import FAILURE_SENSOR, repair_record
from sensors.reconcile import REPAIR_SENSOR, WATCH_SENSOR, drifted_assets

pytestmark = [pytest.mark.twin, pytest.mark.slow]

FORGE = dg.AssetKey(["cluster", "forge"])
STUDIO = dg.AssetKey(["cluster", "studio"])
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MANAGED = "app.kubernetes.io/managed-by"


@pytest.fixture(scope="module")
def world(twin, shipped_inventory):
    """forge running; the twin target's code location and resources over its state dir."""
    twin.up(["forge"])
    settings = Settings(
        twin.root.parent / "homelab.yaml",
        Target.TWIN,
        twin.root.parent,
        twin_port_base=twin.api_port_base,
    )
    defs = build_definitions(settings, shipped_inventory)
    resources = build_deployment(settings, shipped_inventory).resources
    return defs, resources


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def _assets(shipped_inventory) -> list:
    return list(build_homelab_defs(shipped_inventory).assets or [])


def _reconcile(instance, shipped_inventory, resources, keys) -> dg.ExecuteInProcessResult:
    """The reconcile job's checks of ``keys`` (as the schedule's run, tagged like it)."""
    return dg.materialize(
        _assets(shipped_inventory),
        selection=dg.AssetSelection.checks_for_assets(*keys),
        resources=resources,
        instance=instance,
        tags={RECONCILE_TAG: "check", COMMIT_TAG: COMMIT},
        raise_on_error=False,
    )


def _materialise_forge(assets, resources, instance) -> dg.ExecuteInProcessResult:
    first = dg.materialize(
        assets, selection=[FORGE], resources=resources, instance=instance, raise_on_error=False
    )
    assert first.success
    return first


def _tick(defs, instance, name, *, cursor=None, resources=None) -> dg.SensorResult:
    """One tick of a sensor, evaluated as the daemon evaluates it."""
    sensor = defs.resolve_sensor_def(name)
    with dg.build_sensor_context(
        instance=instance, definitions=defs, cursor=cursor, resources=resources
    ) as context:
        return sensor.evaluate_tick(context)


def _repair_tick(defs, instance, cursor=None) -> dg.SensorResult:
    return _tick(defs, instance, REPAIR_SENSOR, cursor=cursor)


def test_a_label_changed_behind_pulumis_back_is_found_named_and_repaired(
    world, twin, shipped_inventory, instance
):
    defs, resources = world
    assets = _assets(shipped_inventory)
    first = _materialise_forge(assets, resources, instance)

    core = client.CoreV1Api(twin.client("forge"))
    core.patch_node("forge-inference", {"metadata": {"labels": {"role": "tampered"}}})
    # A label of an object the stack made (not a patch): another field manager now owns it,
    # which the repair takes back (Pulumi would otherwise refuse: a server-side apply conflict).
    namespace = shipped_inventory.clusters["forge"].namespaces[0]
    core.patch_namespace(namespace, {"metadata": {"labels": {MANAGED: "someone-else"}}})

    checked = _reconcile(instance, shipped_inventory, resources, [FORGE])
    # The blocking nodes_match_inventory fails too (the label is the inventory's): the
    # reconcile run fails, after every check of the step was recorded.
    assert not checked.success
    verdicts = {e.check_name: e for e in checked.get_asset_check_evaluations()}
    assert not verdicts["no_drift"].passed
    assert "forge-inference" in (verdicts["no_drift"].description or "")
    drifts = {d["name"]: d for d in verdicts["no_drift"].metadata["drifted"].value}
    assert set(drifts) == {"node-forge-inference", f"namespace-{namespace}"}, drifts
    drift = drifts["node-forge-inference"]
    assert drift["op"] == "update" and "metadata.labels.role" in drift["properties"], drift
    assert "metadata.labels.role" in (verdicts["no_drift"].description or "")
    assert not verdicts["nodes_match_inventory"].passed
    assert verdicts["nodes_ready"].passed
    assert set(drifted_assets(instance, checked.run_id)) == {FORGE}

    tick = _repair_tick(defs, instance)
    (request,) = tick.run_requests
    assert request.asset_selection == [FORGE]
    assert request.tags[RECONCILE_TAG] == "repair"
    assert request.tags[COMMIT_TAG] == COMMIT
    repaired = dg.materialize(
        assets,
        selection=request.asset_selection,
        resources=resources,
        instance=instance,
        tags=request.tags,
        raise_on_error=False,
    )
    assert repaired.success
    assert core.read_node("forge-inference").metadata.labels["role"] == "inference"
    assert core.read_namespace(namespace).metadata.labels[MANAGED] == "homelab-dagster"
    after = {e.check_name: e for e in repaired.get_asset_check_evaluations()}
    assert after["no_drift"].passed and after["nodes_match_inventory"].passed

    # Both in the asset's history: the materialisations, and the failed check's run.
    history = instance.fetch_materializations(FORGE, limit=10).records
    assert [r.run_id for r in history] == [repaired.run_id, first.run_id]
    newest = history[0].asset_materialization
    assert newest is not None and newest.metadata["homelab_commit"].value == COMMIT
    assert FORGE in drifted_assets(instance, checked.run_id)
    # The same reconcile run is never repaired twice.
    assert not _repair_tick(defs, instance, cursor=tick.cursor).run_requests

    status = collect(instance, defs)["assets"]["cluster/forge"]
    assert status["commit"] == COMMIT
    assert status["drifted"] is False and not status["stalled"]
    assert status["checks"]["nodes_match_inventory"]["passed"] is True


def _watch_tick(defs, instance, resources) -> dg.SensorResult:
    return _tick(defs, instance, WATCH_SENSOR, resources={"kubernetes": resources["kubernetes"]})


def test_the_drift_watch_refreshes_only_a_stack_whose_objects_changed(
    world, twin, shipped_inventory, instance
):
    defs, resources = world
    assets = _assets(shipped_inventory)
    first = _materialise_forge(assets, resources, instance)
    recorded = first.asset_materializations_for_node("cluster__forge")[0].metadata
    objects = recorded["homelab_live_objects"].value
    assert {(o["kind"], o["name"]) for o in objects} >= {("Node", "forge-inference")}

    # Nothing changed by hand (the nodes' heartbeats do not count): no run.
    quiet = _watch_tick(defs, instance, resources)
    assert not quiet.run_requests
    assert "1 stack(s) watched" in (quiet.skip_message or "")

    core = client.CoreV1Api(twin.client("forge"))
    core.patch_node("forge-inference", {"metadata": {"labels": {"role": "watched"}}})
    tick = _watch_tick(defs, instance, resources)
    (request,) = tick.run_requests
    assert {c.asset_key for c in request.asset_check_keys or ()} == {FORGE}
    assert "no_drift" in {c.name for c in request.asset_check_keys or ()}
    assert request.tags[RECONCILE_TAG] == "check"
    # The same change is requested under the same run key: the daemon launches it once.
    (again,) = _watch_tick(defs, instance, resources).run_requests
    assert again.run_key == request.run_key

    checked = dg.materialize(
        assets,
        selection=dg.AssetSelection.checks(*request.asset_check_keys),
        resources=resources,
        instance=instance,
        tags=request.tags,
        raise_on_error=False,
    )
    verdicts = {e.check_name: e for e in checked.get_asset_check_evaluations()}
    assert not verdicts["no_drift"].passed
    assert "metadata.labels.role" in (verdicts["no_drift"].description or "")
    # Drifted: the repair sensor's now; the watch does not ask again.
    assert not _watch_tick(defs, instance, resources).run_requests

    _materialise_forge(assets, resources, instance)
    assert core.read_node("forge-inference").metadata.labels["role"] == "inference"
    assert not _watch_tick(defs, instance, resources).run_requests


def test_a_stack_failing_three_times_is_stalled_while_the_others_reconcile(
    world, shipped_inventory, instance
):
    defs, resources = world
    # studio's API is unreachable: its kubeconfig context names nothing.
    broken = dict(resources)
    kubernetes = resources["kubernetes"]
    assert isinstance(kubernetes, KubernetesClusters)
    broken["kubernetes"] = KubernetesClusters(
        kubeconfig=kubernetes.kubeconfig,
        context_prefix=kubernetes.context_prefix,
        contexts={"studio": "twin-unreachable"},
    )
    failures = defs.resolve_sensor_def(FAILURE_SENSOR)
    for attempt in range(1, 4):
        run = dg.materialize(
            _assets(shipped_inventory),
            selection=[STUDIO],
            resources=broken,
            instance=instance,
            raise_on_error=False,
        )
        assert not run.success
        (event,) = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
        ).records
        context = dg.build_run_status_sensor_context(
            sensor_name=FAILURE_SENSOR,
            dagster_event=event.event_log_entry.dagster_event,
            dagster_instance=instance,
            dagster_run=run.dagster_run,
            resources={k: resources[k] for k in ("webhook", "dagster_on_kubernetes", "kubernetes")},
        )
        failures(context.for_run_failure())
        record = repair_record(instance, STUDIO)
        assert record is not None and record.failures == attempt
    assert record.stalled
    assert "twin-unreachable" in record.reason or "studio" in record.reason, record.reason

    time.sleep(0.01)
    checked = _reconcile(instance, shipped_inventory, broken, [FORGE, STUDIO])
    by_asset = {(e.asset_key, e.check_name): e for e in checked.get_asset_check_evaluations()}
    assert by_asset[(FORGE, "no_drift")].passed  # forge keeps reconciling
    assert not by_asset[(STUDIO, "no_drift")].passed
    tick = _repair_tick(defs, instance)
    assert not tick.run_requests  # studio is stalled: not repaired again
    status = collect(instance, defs)["assets"]
    assert status["cluster/studio"]["stalled"] is True
    assert status["cluster/studio"]["last_failure"] == record.reason
    assert status["cluster/forge"]["stalled"] is False


def test_a_link_just_brought_up_has_no_drift(world, twin, shipped_inventory, instance):
    """Nothing the clusters' controllers fill in after an update (a token Secret's data,
    statuses) counts as drift: else every reconcile would repair the link again. (A link
    pro -> air: two clusters of KWOK nodes only, quick to start.)"""
    from assets.clusters import build_cluster_defs
    from assets.mesh import build_mesh_link_defs
    from homelab_dagster.inventory import MeshLink

    _, resources = world
    twin.up(["pro", "air"])
    link = MeshLink(source="pro", target="air")
    inventory = shipped_inventory
    defs = dg.Definitions.merge(
        *(
            build_cluster_defs(c, inventory.clusters[c], inventory.components)
            for c in ("pro", "air")
        ),
        build_mesh_link_defs(link, inventory.mesh, tuple(inventory.clusters["pro"].namespaces)),
    )
    assets = list(defs.assets or [])
    keys = [dg.AssetKey(["cluster", "pro"]), dg.AssetKey(["cluster", "air"])]
    link_key = dg.AssetKey(["mesh_link", "pro__air"])
    up = dg.materialize(assets, resources=resources, instance=instance, raise_on_error=False)
    assert up.success
    checked = dg.materialize(
        assets,
        selection=dg.AssetSelection.checks_for_assets(link_key, *keys),
        resources=resources,
        instance=instance,
        tags={RECONCILE_TAG: "check"},
        raise_on_error=False,
    )
    verdicts = {(e.asset_key, e.check_name): e for e in checked.get_asset_check_evaluations()}
    for key in (link_key, *keys):
        drift = verdicts[(key, "no_drift")]
        assert drift.passed, drift.description
    assert verdicts[(link_key, "link_works")].passed
