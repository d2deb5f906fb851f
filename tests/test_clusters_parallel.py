"""Two cluster assets in one run: each step is its own process with its own Pulumi program,
so their stacks update at the same time, without lock errors.

The run happens in a process of its own, as ``homelab up`` runs it: its steps fork from a
server (the executor's ``forkserver`` start method) that keeps the environment it started
with, so a test session must not share one between runs with different settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.twin, pytest.mark.slow]

RUN = """
import json, sys
import dagster as dg
from dagster import DagsterEventType
from assets import cluster_key

def main():
    keys = [cluster_key(c) for c in sys.argv[1:]]
    job = dg.build_reconstructable_job("homelab_dagster.definitions", "job", ("up",))
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(job, instance=instance, asset_selection=keys)
        records = instance.get_records_for_run(result.run_id).records
    windows, changed = {}, {}
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is None:
            continue
        if event.event_type in {DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}:
            windows.setdefault(event.step_key, []).append(record.event_log_entry.timestamp)
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            meta = event.event_specific_data.materialization.metadata
            changed[event.asset_key.to_user_string()] = meta["pulumi_resource_count"].value
    failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
    print(json.dumps({"success": result.success, "windows": windows, "changed": changed,
                      "failures": failures}))

if __name__ == "__main__":
    main()
"""


def test_two_clusters_update_in_parallel(twin, tmp_path, project_root):
    twin.up(["air", "pi"])
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = {
        **os.environ,
        "HOMELAB_STATE_DIR": str(twin.root.parent),  # the twin's state: its kubeconfig
        "HOMELAB_TARGET": "twin",
        "DAGSTER_HOME": str(tmp_path),
        "PYTHONPATH": str(project_root),
    }
    env.pop("PULUMI_CONFIG_PASSPHRASE", None)
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    out = subprocess.run(
        [sys.executable, str(script), "air", "pi"],
        cwd=project_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["success"], report["failures"]
    (air_start, air_end) = report["windows"]["cluster__air"]
    (pi_start, pi_end) = report["windows"]["cluster__pi"]
    assert air_start < pi_end and pi_start < air_end, report["windows"]  # they overlapped
    # Each update ran its whole stack (other tests of the session may have applied it already,
    # so what it changed can be nothing; what it processed cannot).
    assert report["changed"]["cluster/air"] > 0 and report["changed"]["cluster/pi"] > 0
