"""Two cluster assets in one run: each step is its own process with its own Pulumi program,
so their stacks update at the same time, without lock errors."""

from __future__ import annotations

import dagster as dg
import pytest
from dagster import DagsterEventType

from assets import cluster_key
from homelab_dagster import launch

pytestmark = [pytest.mark.twin, pytest.mark.slow]


def test_two_clusters_update_in_parallel(twin, monkeypatch, tmp_path):
    twin.up(["air", "pi"])
    # The step processes load the code location from the environment: point it at the twin.
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(twin.root.parent))
    monkeypatch.setenv("HOMELAB_TARGET", "twin")
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    keys = [cluster_key("air"), cluster_key("pi")]
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        result = dg.execute_job(
            dg.reconstructable(launch.up_job), instance=instance, asset_selection=keys
        )
        records = instance.get_records_for_run(result.run_id).records
    assert result.success, [
        e.step_failure_data.error.message for e in result.all_events if e.is_step_failure
    ]
    window: dict[str, list[float]] = {}
    for record in records:
        event = record.event_log_entry.dagster_event
        if event and event.event_type in {
            DagsterEventType.STEP_START,
            DagsterEventType.STEP_SUCCESS,
        }:
            window.setdefault(event.step_key, []).append(record.event_log_entry.timestamp)
    (air_start, air_end), (pi_start, pi_end) = window["cluster__air"], window["cluster__pi"]
    assert air_start < pi_end and pi_start < air_end, window  # the two steps overlapped
    for key in keys:
        (materialization,) = [
            e.event_specific_data.materialization
            for e in result.all_events
            if e.event_type == DagsterEventType.ASSET_MATERIALIZATION and e.asset_key == key
        ]
        assert materialization.metadata["pulumi_changed"].value > 0
