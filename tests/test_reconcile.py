"""The reconcile's rules, settings and wiring (no twin): drift verdicts, back-off and
stalling, readiness, and the code location's reconcile job, schedule and sensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from homelab_dagster.definitions import build_definitions
from homelab_dagster.errors import SettingsError
from homelab_dagster.loader import load_inventory
from homelab_dagster.reconcile import (
    ABSENT,
    STALL_AFTER,
    LiveRef,
    RepairRecord,
    backoff_s,
    changed_objects,
    drift_verdict,
    fingerprint,
    live_refs,
    readiness,
    repair_decision,
)
from homelab_dagster.settings import Settings, Target
from resources.deployment import build_deployment

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class _Step:
    op: str
    type: str
    name: str
    diffs: tuple[str, ...] = ()

    @property
    def changes(self) -> bool:
        return self.op not in {"same", "read", "refresh"}


def test_no_changed_step_is_no_drift():
    verdict = drift_verdict(
        "twin.cluster.forge",
        [
            _Step("same", "pulumi:pulumi:Stack", "s"),
            _Step("same", "kubernetes:core/v1:Namespace", "ns"),
        ],
    )
    assert verdict.passed
    assert "no drift (1 resources" in verdict.description


def test_drift_names_each_resource_and_its_properties():
    verdict = drift_verdict(
        "twin.cluster.forge",
        [
            _Step("update", "kubernetes:core/v1:NodePatch", "node-forge-inference", ("metadata",)),
            _Step("delete", "kubernetes:core/v1:Namespace", "namespace-data-ml"),
            _Step("same", "kubernetes:core/v1:Namespace", "namespace-ml"),
        ],
    )
    assert not verdict.passed
    assert "2 resource(s) drifted" in verdict.description
    assert "node-forge-inference (update: metadata)" in verdict.description
    assert "namespace-data-ml (delete)" in verdict.description
    assert verdict.metadata["drifted"][0]["properties"] == ["metadata"]


def test_back_off_doubles_and_is_bounded():
    assert backoff_s(0) == 0
    assert backoff_s(2) == 2 * backoff_s(1)
    assert backoff_s(100) == backoff_s(99)


def test_repair_waits_out_the_back_off_then_stalls():
    first = RepairRecord.first("refused", "run-1", at=1000.0)
    go, why = repair_decision("cluster/forge", first, enabled=True, now=1000.0 + 1)
    assert not go and "next try in" in why
    go, _ = repair_decision("cluster/forge", first, enabled=True, now=first.next_repair_at)
    assert go
    record = first
    for n in range(2, STALL_AFTER + 1):
        record = record.then_failed(f"refused {n}", f"run-{n}", at=1000.0 + n)
    assert record.stalled
    go, why = repair_decision("cluster/forge", record, enabled=True, now=10**12)
    assert not go and "stalled" in why and f"refused {STALL_AFTER}" in why


def test_repair_is_off_where_the_family_is_not_repaired():
    go, why = repair_decision("cluster/forge", None, enabled=False, now=0)
    assert not go and "auto-repair is off" in why


def test_a_record_round_trips_through_metadata():
    record = RepairRecord(2, "boom", "run-9", at=5.0)
    assert RepairRecord.from_metadata(record.metadata(), at=5.0) == record
    assert RepairRecord.from_metadata({"pulumi_stack": "x"}, at=5.0) is None


def test_readiness_counts_never_evaluated_checks_as_not_passing():
    assert readiness({"a": True, "b": True, "c": False, "d": None}) == 0.5
    assert readiness({}) == 0.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("all", frozenset({"cluster", "mesh_link", "model_weights"})),
        ("none", frozenset()),
        ("cluster, mesh_link", frozenset({"cluster", "mesh_link"})),
    ],
)
def test_auto_repair_setting(raw, expected):
    env = {} if raw is None else {"HOMELAB_AUTO_REPAIR": raw}
    assert Settings.from_env(env).auto_repair == expected


def test_the_drift_watch_interval_is_read_in_seconds():
    assert Settings.from_env({}).drift_watch_s == 30
    assert Settings.from_env({"HOMELAB_DRIFT_WATCH_S": "5"}).drift_watch_s == 5


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("HOMELAB_AUTO_REPAIR", "clusters", "clusters is not a family"),
        ("HOMELAB_RECONCILE_CRON", "every five minutes", "not a cron expression"),
        ("HOMELAB_DRIFT_WATCH_S", "1", "between 5 and 86400"),
        ("HOMELAB_DRIFT_WATCH_S", "30s", "not a number of seconds"),
    ],
)
def test_bad_reconcile_settings_are_named(variable, value, named):
    with pytest.raises(SettingsError, match=named) as caught:
        Settings.from_env({variable: value})
    assert variable in str(caught.value)


@pytest.mark.parametrize(
    ("target", "families", "running"),
    [
        (Target.TWIN, {"cluster", "mesh_link", "model_weights"}, dg.DefaultSensorStatus.RUNNING),
        (Target.HOMELAB, set(), dg.DefaultSensorStatus.STOPPED),
    ],
)
def test_repair_and_automation_defaults_per_target(
    project_root, tmp_path, target, families, running
):
    settings = Settings(project_root / "homelab.yaml", target, tmp_path)
    inventory = load_inventory(settings.inventory_path).inventory
    assert build_deployment(settings, inventory).auto_repair == families
    defs = build_definitions(settings, inventory)
    assert defs.resolve_sensor_def("automation").default_status == running
    schedule = defs.resolve_schedule_def("reconcile")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.cron_schedule == "*/5 * * * *"
    for name in ("reconcile_repair", "run_failures", "check_alerts", "drift_watch"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING
    watch = defs.resolve_sensor_def("drift_watch")
    assert watch.minimum_interval_seconds == 30
    assert [t.job_name for t in watch.targets] == ["reconcile"]


@pytest.mark.parametrize("target", list(Target))
def test_automation_off_starts_every_schedule_and_sensor_stopped(project_root, tmp_path, target):
    settings = Settings.from_env(
        {
            "HOMELAB_AUTOMATION": "off",
            "HOMELAB_TARGET": target.value,
            "HOMELAB_STATE_DIR": str(tmp_path),
        }
    )
    inventory = load_inventory(settings.inventory_path).inventory
    defs = build_definitions(settings, inventory)
    repository = defs.get_repository_def()
    schedules, sensors = repository.schedule_defs, repository.sensor_defs
    assert schedules and sensors
    for schedule in schedules:
        assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED, schedule.name
    for sensor in sensors:
        assert sensor.default_status == dg.DefaultSensorStatus.STOPPED, sensor.name


def test_a_bad_automation_setting_is_named():
    with pytest.raises(SettingsError, match="HOMELAB_AUTOMATION='sometimes' is neither on nor off"):
        Settings.from_env({"HOMELAB_AUTOMATION": "sometimes"})


def test_the_reconcile_job_checks_every_stack_and_model_and_materialises_nothing(
    project_root, tmp_path
):
    settings = Settings(project_root / "homelab.yaml", Target.TWIN, tmp_path)
    inventory = load_inventory(settings.inventory_path).inventory
    defs = build_definitions(settings, inventory)
    job = defs.resolve_job_def("reconcile")
    graph = job.asset_layer.asset_graph
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    for cluster in inventory.clusters:
        assert (f"cluster/{cluster}", "no_drift") in checks
        assert (f"cluster/{cluster}", "nodes_match_inventory") in checks
    for link in inventory.mesh.links:
        assert (f"mesh_link/{link.source}__{link.target}", "link_works") in checks
    trained = [m for m, model in inventory.models.items() if model.source != "external"]
    assert {(f"model_weights/{m}", "weights_intact") for m in trained} <= checks
    assert not job.asset_layer.selected_asset_keys
    up = defs.resolve_job_def("up").asset_layer.asset_graph.asset_check_keys
    assert not [k for k in up if k.name == "no_drift"]


def test_links_and_weights_follow_their_upstreams(project_root, tmp_path):
    settings = Settings(project_root / "homelab.yaml", Target.TWIN, tmp_path)
    inventory = load_inventory(settings.inventory_path).inventory
    graph = build_definitions(settings, inventory).resolve_asset_graph()
    link = inventory.mesh.links[0]
    link_key = dg.AssetKey(["mesh_link", f"{link.source}__{link.target}"])
    for key in (link_key, dg.AssetKey(["model_weights", "sre-agent"])):
        condition = graph.get(key).automation_condition
        assert condition is not None
        assert "all_deps_blocking_checks_passed" in str(condition)
    assert graph.get(dg.AssetKey(["cluster", "forge"])).automation_condition is None


def test_a_refresh_names_the_properties_that_differ_never_their_values():
    from resources._stack_result import changed_paths

    state = {"metadata": {"labels": {"role": "inference"}, "resourceVersion": "7"}, "spec": {}}
    live = {"metadata": {"labels": {"role": "tampered"}, "resourceVersion": "9"}, "spec": {}}
    assert changed_paths(state, live) == ["metadata.labels.role"]
    secret = {"4dabf18193072939515e22adb298388d": "x", "value": "old"}
    assert changed_paths({"token": secret}, {"token": {**secret, "value": "new"}}) == ["token"]
    assert changed_paths(state, state) == []


def test_the_schedules_runs_carry_the_watched_head_commit(project_root, tmp_path):
    import subprocess

    from resources.git import GitRepository

    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (
        ["init", "-q", "-b", "main"],
        ["-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "--allow-empty", "-m", "x"],
    ):
        subprocess.run(["git", *args], cwd=repo, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()
    settings = Settings(project_root / "homelab.yaml", Target.TWIN, tmp_path / "state")
    defs = build_definitions(settings, load_inventory(settings.inventory_path).inventory)
    schedule = defs.resolve_schedule_def("reconcile")
    git = GitRepository(url=str(repo), branch="main", state_dir=str(tmp_path / "git"))
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance, resources={"git": git})
        (request,) = schedule.evaluate_tick(context).run_requests or []
    assert request.tags["homelab/commit"] == head
    assert request.tags["homelab/reconcile"] == "check"
    assert schedule.job_name == "reconcile"


def _drifted_reconcile_run(instance: dg.DagsterInstance) -> tuple[dg.AssetsDefinition, str]:
    """A finished reconcile run in which cluster/x's no_drift check failed."""
    key = dg.AssetKey(["cluster", "x"])

    @dg.asset(key=key, check_specs=[dg.AssetCheckSpec("no_drift", asset=key)])
    def x() -> dg.MaterializeResult:
        return dg.MaterializeResult(
            check_results=[dg.AssetCheckResult(passed=False, description="x drifted")]
        )

    run = dg.materialize([x], instance=instance, tags={"homelab/reconcile": "check"})
    return x, run.run_id


def _repair_sensor(families: frozenset[str]) -> dg.SensorDefinition:
    from sensors.reconcile import REPAIR_SENSOR, build_reconcile_defs

    defs = build_reconcile_defs(
        load_inventory(ROOT / "homelab.yaml").inventory,
        cron="*/5 * * * *",
        running=True,
        repair_families=families,
        automation_running=False,
        watch_s=30,
    )
    (sensor,) = [s for s in defs.sensors or () if s.name == REPAIR_SENSOR]
    assert isinstance(sensor, dg.SensorDefinition)
    return sensor


@pytest.mark.parametrize(
    ("families", "in_progress", "requested"),
    [
        (frozenset({"cluster"}), False, True),
        (frozenset(), False, False),  # auto-repair off for clusters: left for a person
        (frozenset({"cluster"}), True, False),  # a repair run is still going
    ],
)
def test_the_repair_sensor_requests_only_what_it_may_repair_now(families, in_progress, requested):
    with dg.instance_for_test() as instance:
        asset, run_id = _drifted_reconcile_run(instance)
        if in_progress:
            job = dg.define_asset_job("repair", selection=[asset.key]).resolve(
                asset_graph=dg.Definitions(assets=[asset]).resolve_asset_graph()
            )
            instance.create_run_for_job(
                job, tags={"homelab/reconcile": "repair"}, asset_selection=frozenset({asset.key})
            )
        with dg.build_sensor_context(instance=instance) as context:
            result = _repair_sensor(families).evaluate_tick(context)
    assert bool(result.run_requests) == requested
    assert result.cursor == run_id  # this reconcile run is handled either way
    if requested:
        (request,) = result.run_requests
        assert request.asset_selection == [asset.key]
        assert request.tags["homelab/reconciled-by"] == run_id


# ---------------------------------------------------------------------- the drift watch's rules

_NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "forge-inference",
        "labels": {"role": "inference"},
        "resourceVersion": "100",
        "managedFields": [{"manager": "kubelet", "subresource": "status"}],
    },
    "spec": {"taints": []},
    "status": {"conditions": [{"type": "Ready", "lastHeartbeatTime": "10:00"}]},
}


def _with(obj: dict, path: tuple[str, ...], value: object) -> dict:
    import copy

    changed = copy.deepcopy(obj)
    node = changed
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return changed


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("status", "conditions"), [{"type": "Ready", "lastHeartbeatTime": "10:05"}]),
        (("metadata", "resourceVersion"), "101"),
        (("metadata", "managedFields"), [{"manager": "kubelet", "time": "10:05"}]),
    ],
)
def test_what_the_cluster_changes_on_its_own_keeps_the_fingerprint(path, value):
    assert fingerprint(_with(_NODE, path, value)) == fingerprint(_NODE)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("metadata", "labels"), {"role": "tampered"}),
        (("metadata", "annotations"), {"note": "by hand"}),
        (("spec", "taints"), [{"key": "gpu", "effect": "NoSchedule"}]),
    ],
)
def test_a_change_by_a_person_changes_the_fingerprint(path, value):
    assert fingerprint(_with(_NODE, path, value)) != fingerprint(_NODE)


def test_a_gone_object_is_absent_and_each_change_is_said():
    assert fingerprint(None) == ABSENT
    recorded = {"a": "1", "b": "2", "c": "3"}
    live = {"a": "1", "b": "9", "c": ABSENT, "d": "4"}
    assert changed_objects(recorded, live) == ["b changed", "c deleted", "d not recorded"]
    assert changed_objects(recorded, recorded) == []


def _exported(*resources: dict) -> dict:
    provider = {
        "urn": "urn:pulumi:twin.cluster.pi::homelab::pulumi:providers:kubernetes::pi",
        "type": "pulumi:providers:kubernetes",
        "inputs": {"context": "twin-pi"},
    }
    stack = {
        "urn": "urn:pulumi:twin.cluster.pi::homelab::pulumi:pulumi:Stack::s",
        "type": "pulumi:pulumi:Stack",
    }
    return {"resources": [stack, provider, *resources]}


def _resource(type_: str, outputs: dict) -> dict:
    return {
        "type": type_,
        "provider": "urn:pulumi:twin.cluster.pi::homelab::pulumi:providers:kubernetes::pi::id-1",
        "outputs": outputs,
    }


def test_a_states_objects_are_read_with_their_providers_context():
    refs = live_refs(
        _exported(
            _resource(
                "kubernetes:core/v1:NodePatch",
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "pi-edge-1"}},
            ),
            _resource(
                "kubernetes:core/v1:ResourceQuota",
                {
                    "apiVersion": "v1",
                    "kind": "ResourceQuota",
                    "metadata": {"name": "homelab-quota", "namespace": "edge"},
                },
            ),
        )
    )
    assert refs == [
        LiveRef("twin-pi", "v1", "Node", "", "pi-edge-1"),
        LiveRef("twin-pi", "v1", "ResourceQuota", "edge", "homelab-quota"),
    ]
    assert str(refs[1]) == "twin-pi:v1/ResourceQuota/edge/homelab-quota"
    assert LiveRef.from_record(refs[1].record("abc")) == (refs[1], "abc")


def test_a_state_holding_a_helm_release_is_not_watched():
    release = _resource("kubernetes:helm.sh/v3:Release", {"name": "flux2", "status": {}})
    assert live_refs(_exported(release)) is None
