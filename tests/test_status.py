"""``homelab status``: read from a real Dagster instance (a temporary ``DAGSTER_HOME``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from typer.testing import CliRunner

from assets.endpoints import gpu_seconds_served
from homelab_dagster.cli.app import app
from homelab_dagster.cli.status import GpuUse, collect, gpu_hours

FORGE = dg.AssetKey(["cluster", "forge"])
SHA = "89abcdef0123456789abcdef0123456789abcdef"


def _record(home) -> None:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=FORGE, metadata={"homelab_commit": SHA})
        )
        for check, passed in (("nodes_ready", True), ("no_drift", False)):
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=FORGE, check_name=check, passed=passed, description=check
                )
            )
        instance.report_runless_asset_event(
            dg.AssetObservation(
                asset_key=FORGE,
                metadata={"homelab_failures": 3, "homelab_last_failure": "refused"},
            )
        )


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty Dagster home (and state dir) that ``homelab status`` reads; a first ``status``
    has written its dagster.yaml."""
    home = tmp_path / "dagster"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("COLUMNS", "200")
    assert CliRunner().invoke(app, ["status"]).exit_code == 0
    return home


def test_status_shows_the_commit_checks_drift_stall_and_readiness(home):
    runner = CliRunner()
    _record(home)

    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    forge = report["assets"]["cluster/forge"]
    assert forge["commit"] == SHA
    assert forge["checks"]["nodes_ready"]["passed"] is True
    assert forge["checks"]["nodes_match_inventory"]["passed"] is None
    assert forge["drifted"] is True
    assert forge["stalled"] is True and forge["last_failure"] == "refused"
    # forge: 1 of the checks of it, its outgoing links and the runs and endpoints on it
    # passes (the rest never evaluated), and each of the others is named.
    counted = [
        f"{name}:{check}"
        for name, asset in report["assets"].items()
        if name == "cluster/forge"
        or name.startswith(("mesh_link/forge__", "vllm_endpoint/", "training_run/"))
        for check in asset["checks"]
    ]
    assert any(c.startswith("vllm_endpoint/sre-agent:") for c in counted)
    assert report["readiness"]["forge"] == round(1 / len(counted), 3)
    missing = report["readiness_missing"]["forge"]
    assert "cluster/forge:no_drift: failed" in missing
    assert "vllm_endpoint/sre-agent:serves_weights: never" in missing
    assert len(missing) == len(counted) - 1
    assert report["readiness"]["air"] == 0.0
    assert report["assets"]["cluster/air"]["materialized_at"] is None

    screen = runner.invoke(app, ["status"]).output
    assert SHA[:12] in screen and "stalled" in screen and "drifted" in screen


def test_stale_and_skipped_check_results_are_unknown_not_passing(home):
    """A result older than --stale-after counts as unknown, whatever it said; an endpoint
    whose checks were skipped is not ``ok`` but says why; every result shows its age."""
    runner = CliRunner()
    endpoint = dg.AssetKey(["vllm_endpoint", "vllm"])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=endpoint))
        for check in ("serves_weights", "completion_within_budget", "chat_completion"):
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=endpoint,
                    check_name=check,
                    passed=False,
                    severity=dg.AssetCheckSeverity.WARN,
                    description="skipped: the twin cannot fetch it",
                    metadata={"skipped": True},
                )
            )
    _record(home)

    fresh = json.loads(runner.invoke(app, ["status", "--json"]).output)
    vllm = fresh["assets"]["vllm_endpoint/vllm"]["checks"]["serves_weights"]
    assert vllm["outcome"] == "skipped" and vllm["passed"] is None
    assert vllm["age_s"] < 60
    nodes_ready = fresh["assets"]["cluster/forge"]["checks"]["nodes_ready"]
    assert nodes_ready["outcome"] == "passed" and nodes_ready["passed"] is True
    assert "vllm_endpoint/vllm:serves_weights: skipped" in fresh["readiness_missing"]["forge"]
    assert fresh["readiness"]["forge"] > 0

    stale = json.loads(runner.invoke(app, ["status", "--json", "--stale-after", "0"]).output)
    nodes_ready = stale["assets"]["cluster/forge"]["checks"]["nodes_ready"]
    assert nodes_ready["outcome"] == "stale" and nodes_ready["passed"] is None
    assert stale["readiness"]["forge"] == 0.0

    screen = runner.invoke(app, ["status"]).output
    assert "checks skipped" in screen and "s ago" in screen


# ---------------------------------------------------------------------------- GPU-hours

RUNBOOK = dg.AssetKey(["training_run", "sre-runbook"])  # sre-agent, on forge
VLLM = dg.AssetKey(["vllm_endpoint", "vllm"])  # llama-3.1-70b-instruct, on forge


def _utc(*when: int) -> float:
    return datetime(*when, tzinfo=UTC).timestamp()


def test_gpu_hours_split_by_calendar_month():
    now = _utc(2026, 3, 10, 12)
    a_on_forge = (("models", "a"), ("clusters", "forge"))
    served = (("models", "a"), ("endpoints", "e"), ("clusters", "forge"))
    uses = [
        GpuUse(a_on_forge, _utc(2026, 2, 20), _utc(2026, 2, 20), 7200.0),  # last month
        GpuUse(a_on_forge, _utc(2026, 3, 1), _utc(2026, 3, 1), 3600.0),  # at the 1st: this one
        # 2 GPUs from Feb 28 12:00 to Mar 1 12:00: half of it this month.
        GpuUse(served, _utc(2026, 2, 28, 12), _utc(2026, 3, 1, 12), 2 * 86400.0),
        GpuUse((("models", "b"), ("clusters", "air")), _utc(2026, 3, 9), _utc(2026, 3, 9), 1800),
    ]
    hours = gpu_hours(uses, now, rows=[("endpoints", "idle")])
    assert hours["month"] == "2026-03"
    assert hours["models"] == {
        "a": {"this_month": 25.0, "all_time": 51.0},
        "b": {"this_month": 0.5, "all_time": 0.5},
    }
    assert hours["endpoints"] == {
        "e": {"this_month": 24.0, "all_time": 48.0},
        "idle": {"this_month": 0.0, "all_time": 0.0},
    }
    assert hours["clusters"] == {
        "air": {"this_month": 0.5, "all_time": 0.5},
        "forge": {"this_month": 25.0, "all_time": 51.0},
    }
    # On the 1st of April, March is last month.
    april = gpu_hours(uses, _utc(2026, 4, 1))
    assert april["month"] == "2026-04" and april["models"]["a"]["this_month"] == 0.0


def _materialise(instance: dg.DagsterInstance, key: dg.AssetKey, **metadata: object) -> float:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, metadata=metadata))
    event = instance.get_latest_materialization_event(key)
    assert event is not None
    return event.timestamp


def test_status_counts_gpu_hours_per_model_endpoint_and_cluster(home, monkeypatch):
    from homelab_dagster.cli import status as status_module
    from homelab_dagster.definitions import defs

    runner = CliRunner()
    monkeypatch.setattr(status_module, "_PAGE", 2)  # several pages of materialisations

    with dg.DagsterInstance.from_config(str(home)) as instance:
        start = _materialise(instance, RUNBOOK, reused=False, gpu_seconds=3600.0)
        _materialise(instance, RUNBOOK, reused=True)  # reused: no GPU-seconds
        _materialise(instance, RUNBOOK, reused=False, gpu_seconds=1800.0)
        first = _materialise(instance, VLLM, gpus=2, gpu_seconds_served=0.0)
        served = gpu_seconds_served(instance.get_latest_materialization_event(VLLM), first + 3600)
        assert served == 7200.0  # 2 GPUs for an hour
        last = _materialise(instance, VLLM, gpus=2, gpu_seconds_served=served)

        # Half an hour after the last deployment: all of it this month (the 1st is far).
        report = collect(instance, defs, now=last + 1800)["gpu_hours"]
        # The next month's first half hour: what serves now straddles the 1st.
        month = datetime.fromtimestamp(last, UTC).replace(day=28) + timedelta(days=4)
        next_month = month.replace(day=1, hour=0, minute=30, second=0, microsecond=0)
        later = collect(instance, defs, now=next_month.timestamp())["gpu_hours"]

    # sre-agent trains on forge: 1.5 h; the 70B serves on forge: 2 h recorded + 1 h running.
    assert report["models"]["sre-agent"]["all_time"] == 1.5
    assert report["endpoints"]["vllm"]["all_time"] == 3.0
    assert report["models"]["llama-3.1-70b-instruct"]["all_time"] == 3.0
    assert report["clusters"]["forge"]["all_time"] == 4.5
    assert report["endpoints"]["sre-agent"] == {"this_month": 0.0, "all_time": 0.0}
    if report["month"] == datetime.fromtimestamp(start, UTC).strftime("%Y-%m"):  # not the 1st
        assert report["clusters"]["forge"]["this_month"] == 4.5

    assert later["month"] == next_month.strftime("%Y-%m")
    # Last month's training is not this month's; of the deployment serving since, its half
    # hour (2 GPUs) in this month is.
    assert later["models"]["sre-agent"] == {"this_month": 0.0, "all_time": 1.5}
    running = 2 * (next_month.timestamp() - last) / 3600
    assert later["endpoints"]["vllm"] == {"this_month": 1.0, "all_time": round(2 + running, 3)}
    assert later["clusters"]["forge"]["this_month"] == 1.0

    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["gpu_hours"]["models"]["sre-agent"]["all_time"] == 1.5
    screen = runner.invoke(app, ["status"]).output
    assert "GPU-hours" in screen and "model sre-agent" in screen and "endpoint vllm" in screen


def test_an_endpoint_with_no_gpus_or_no_deployment_served_nothing(tmp_path):
    assert gpu_seconds_served(None, 1e9) == 0.0
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        at = _materialise(instance, VLLM, gpus=0, gpu_seconds_served=0.0)
        assert gpu_seconds_served(instance.get_latest_materialization_event(VLLM), at + 60) == 0.0
        at = _materialise(instance, VLLM, gpus=4, gpu_seconds_served=0.0)
        served = gpu_seconds_served(instance.get_latest_materialization_event(VLLM), at + 60)
        assert served == 240.0 and isinstance(served, float)
