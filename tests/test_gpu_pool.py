"""GPU steps in one pool do not run at once: the instance's ``concurrency: pools: default_limit``.

Each GPU cluster's steps share a Dagster pool (``assets.training.gpu_pool``); the dagster.yaml
this project writes gives a pool one slot unless it is configured otherwise. Proven on real
runs with the multiprocess executor, from the steps' own start and success times: on the
instance ``ensure_dagster_home`` writes, and on one without the limit, where the same steps
do run at once.

The runs happen in a process of their own, as in tests/test_clusters_parallel.py: the executor's
steps fork from a server (``forkserver``) that keeps the environment it started with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from homelab_dagster.cli.launch import ensure_dagster_home
from homelab_dagster.settings import Settings
from resources.deployment import build_deployment

# Two assets in one pool and two in none, each holding its "GPU" for 2 s, in one run.
RUN = """
import json, sys, time
import dagster as dg

def pool_job():
    def hold():
        time.sleep(2.0)

    @dg.asset(pool="gpu-test")
    def pooled_a():
        hold()

    @dg.asset(pool="gpu-test")
    def pooled_b():
        hold()

    @dg.asset
    def free_a():
        hold()

    @dg.asset
    def free_b():
        hold()

    job = dg.define_asset_job("pool_job", executor_def=dg.multiprocess_executor)
    defs = dg.Definitions(assets=[pooled_a, pooled_b, free_a, free_b], jobs=[job])
    return defs.resolve_job_def("pool_job")

def main():
    # Steps fork from one server, started once, that has imported Dagster already.
    start = {"forkserver": {"preload_modules": ["dagster"]}}
    run_config = {"execution": {"config": {"max_concurrent": 4, "start_method": start}}}
    step_events = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
    report = {}
    for home in sys.argv[1:]:  # one run on each instance, one after the other
        with dg.DagsterInstance.from_config(home) as instance:
            with dg.execute_job(
                dg.reconstructable(pool_job), instance=instance, run_config=run_config
            ) as result:
                success, run_id = result.success, result.run_id
            spans = {}
            for entry in instance.all_logs(run_id, of_type=step_events):
                spans.setdefault(entry.step_key, []).append(entry.timestamp)
        report[home] = {"success": success, "spans": spans}
    print(json.dumps(report))

if __name__ == "__main__":
    main()
"""


def _runs(script: Path, homes: list[Path], project_root: Path) -> dict[str, dict[str, list[float]]]:
    """One run of the pool job on each home's instance: each step's [start, success]."""
    done = subprocess.run(
        [sys.executable, str(script), *map(str, homes)],
        cwd=project_root,
        env={**os.environ, "PYTHONPATH": str(project_root)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(run["success"] for run in report.values()), done.stderr[-3000:]
    return {home: run["spans"] for home, run in report.items()}


def _overlap(spans: dict[str, list[float]], first: str, second: str) -> bool:
    (a_start, a_end), (b_start, b_end) = sorted(spans[first]), sorted(spans[second])
    return a_start < b_end and b_start < a_end


@pytest.mark.slow
def test_a_pools_steps_run_one_at_a_time_on_the_instance_we_write(
    tmp_path, project_root, monkeypatch
):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    limited = tmp_path / "limited"
    monkeypatch.setenv("DAGSTER_HOME", str(limited))
    ensure_dagster_home(Settings.from_env({"HOMELAB_STATE_DIR": str(tmp_path / "state")}))
    written = yaml.safe_load((limited / "dagster.yaml").read_text())
    assert written["concurrency"] == {"pools": {"default_limit": 1}}

    unlimited = tmp_path / "unlimited"
    unlimited.mkdir()
    (unlimited / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    runs = _runs(script, [limited, unlimited], project_root)

    spans = runs[str(limited)]
    assert not _overlap(spans, "pooled_a", "pooled_b"), spans
    # Steps in no pool are not limited: they run at once.
    assert _overlap(spans, "free_a", "free_b"), spans
    # Without the limit the same pooled steps overlap: the first assertion can fail.
    spans = runs[str(unlimited)]
    assert _overlap(spans, "pooled_a", "pooled_b"), spans


def test_the_pods_instance_has_the_same_limit(tmp_path, project_root, shipped_inventory):
    settings = Settings.from_env(
        {
            "HOMELAB_STATE_DIR": str(tmp_path / "state"),
            "HOMELAB_INVENTORY": str(project_root / "homelab.yaml"),
            "HOMELAB_RUNS": "kubernetes",
        }
    )
    deployment = build_deployment(settings, shipped_inventory)
    assert deployment.instance_yaml is not None
    instance = yaml.safe_load(deployment.instance_yaml)
    assert instance["concurrency"] == {"pools": {"default_limit": 1}}


def test_every_training_run_is_in_its_clusters_gpu_pool():
    from assets.training import gpu_pool
    from homelab_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    training = [k for k in graph.get_all_asset_keys() if k.path[0] == "training_run"]
    assert training
    for key in training:
        node = graph.get(key)
        assert node.pools == {gpu_pool(str(node.metadata["cluster"]))}
