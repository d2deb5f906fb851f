"""``homelab status``: read from a real Dagster instance (a temporary ``DAGSTER_HOME``)."""

from __future__ import annotations

import json

import dagster as dg
from typer.testing import CliRunner

from homelab_dagster.cli.app import app

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


def test_status_shows_the_commit_checks_drift_stall_and_readiness(tmp_path, monkeypatch):
    home = tmp_path / "dagster"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    assert runner.invoke(app, ["status"]).exit_code == 0  # writes dagster.yaml; empty
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
    # forge: 1 of its checks and of its outgoing links' passes (the rest never evaluated).
    counted = [
        check
        for name, asset in report["assets"].items()
        if name == "cluster/forge" or name.startswith("mesh_link/forge__")
        for check in asset["checks"]
    ]
    assert report["readiness"]["forge"] == round(1 / len(counted), 3)
    assert report["readiness"]["air"] == 0.0
    assert report["assets"]["cluster/air"]["materialized_at"] is None

    screen = runner.invoke(app, ["status"]).output
    assert SHA[:12] in screen and "stalled" in screen and "drifted" in screen
