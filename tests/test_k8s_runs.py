"""Dagster's runs on Kubernetes, on the twin: the orchestrator asset deploys Dagster to
Studio, and runs execute as pods on Studio's real node (``studio-platform-a``).

- ``homelab up`` with ``HOMELAB_RUNS=kubernetes``: the CLI's process runs the run, and
  dagster-k8s's ``k8s_job_executor`` runs each step as a Job of the project's image;
- a run submitted to the orchestrator's webserver (a pod, reached through a port-forward, as
  the UI would be) is launched by dagster-k8s's ``K8sRunLauncher`` as a run pod, whose steps
  are pods again.

The project's image is built from the lock file and pushed to the twin's registry first
(`homelab twin images`; cached by content). Real nodes and image builds need root on Linux;
elsewhere these tests skip with the reason (in CI as root they fail instead).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _twin_support import wait

from assets._stack import STACK_STEP_TAGS

pytestmark = [pytest.mark.twin, pytest.mark.slow]

STUDIO_REAL_NODE = "studio-platform-a"
NAMESPACE = "dagster"


def _need(reason: str | None) -> None:
    if reason is None:
        return
    root_on_linux = sys.platform.startswith("linux") and os.geteuid() == 0
    if os.environ.get("CI") and root_on_linux:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def pods_world(twin, project_root: Path, tmp_path_factory) -> dict[str, str]:
    """Studio and Forge up with their real nodes, the project's image in the twin's
    registry, and the orchestrator deployed (by a local run: it is what makes pods possible)."""
    from infra.images import ImageBuilder, missing_tools

    _need(missing_tools())
    twin.up(["studio", "forge"])
    _need(str(twin.real_fallback) if twin.real_fallback else None)
    ImageBuilder().build_and_push(["homelab-dagster"], twin.registry)
    env = {
        **os.environ,
        "HOMELAB_STATE_DIR": str(twin.root.parent),
        "HOMELAB_TWIN_PORT_BASE": str(twin.api_port_base),
        "HOMELAB_INVENTORY": str(project_root / "homelab.yaml"),
        "DAGSTER_HOME": str(tmp_path_factory.mktemp("dagster-home")),
        "HOMELAB_RUNS": "local",
    }
    env.pop("HOMELAB_TARGET", None)
    _homelab(env, "up", "--env", "studio")
    return env


def _homelab(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "homelab_dagster", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"homelab {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _batch_and_core(twin):
    from kubernetes import client

    api = twin.client("studio")
    return client.BatchV1Api(api), client.CoreV1Api(api)


def _pods_of_jobs(core, prefix: str) -> list:
    pods = core.list_namespaced_pod(NAMESPACE).items
    return [p for p in pods if (p.metadata.labels or {}).get("job-name", "").startswith(prefix)]


def test_the_orchestrator_runs_dagster_on_studios_real_node(pods_world, twin):
    from dagster import AssetCheckKey, AssetKey, DagsterInstance

    _, core = _batch_and_core(twin)
    running = {
        p.metadata.labels.get("app.kubernetes.io/name"): p
        for p in core.list_namespaced_pod(NAMESPACE).items
        if p.status.phase == "Running"
    }
    assert "dagster-webserver" in running
    assert {p.spec.node_name for p in running.values()} == {STUDIO_REAL_NODE}
    with DagsterInstance.from_config(pods_world["DAGSTER_HOME"]) as instance:
        for name in ("webserver_answers", "runs_allowed"):
            check = AssetCheckKey(AssetKey("orchestrator"), name)
            [latest] = instance.event_log_storage.get_asset_check_execution_history(check, limit=1)
            assert latest.status.value == "SUCCEEDED", (name, latest)


def test_homelab_up_runs_each_step_as_a_pod_on_studios_real_node(pods_world, twin):
    env = {**pods_world, "HOMELAB_RUNS": "kubernetes"}
    started = time.time()
    _homelab(env, "up", "--env", "forge")
    _, core = _batch_and_core(twin)

    def finished_steps():
        pods = [
            p
            for p in _pods_of_jobs(core, "dagster-step-")
            if p.metadata.creation_timestamp.timestamp() >= started - 5
        ]
        # A step's process reports success, then exits: its pod ends a moment later.
        return pods if pods and all(p.status.phase != "Running" for p in pods) else None

    steps = wait(finished_steps, timeout=120)
    ops = {p.metadata.labels.get("dagster/op") for p in steps}
    assert {"cluster__forge", "cluster__studio", "mesh_link__studio__forge"} <= ops, ops
    for pod in steps:
        assert pod.spec.node_name == STUDIO_REAL_NODE
        assert pod.spec.node_selector == {"role": "platform", "type": "real"}
        assert pod.status.phase == "Succeeded", (pod.metadata.name, pod.status)
        container = pod.spec.containers[0]
        assert container.image == "ghcr.io/homelab/homelab-dagster:0.1.0"
        wanted = STACK_STEP_TAGS["dagster-k8s/config"]["container_config"]["resources"]
        if pod.metadata.labels.get("dagster/op", "").startswith(("cluster__", "mesh_link__")):
            assert container.resources.requests == wanted["requests"]
    # The step's work happened: Forge's node labels are the inventory's again.
    from kubernetes import client

    node = client.CoreV1Api(twin.client("forge")).read_node("forge-training-primary")
    assert node.metadata.labels.get("resource-profile") == "gpu-intensive"


def test_a_run_submitted_to_the_orchestrator_runs_as_a_run_pod(pods_world, twin):
    """What the UI's "Materialize" does: the webserver (a pod) launches the run with
    K8sRunLauncher; the run pod runs its step as a pod; Dagster records success and the
    step's logs."""
    from dagster_graphql import DagsterGraphQLClient

    from resources.kubernetes import KubernetesClusters

    _, core = _batch_and_core(twin)
    pod = next(
        p.metadata.name
        for p in core.list_namespaced_pod(
            NAMESPACE, label_selector="app.kubernetes.io/name=dagster-webserver"
        ).items
        if p.status.phase == "Running"
    )
    instance_yaml = yaml.safe_load(
        core.read_namespaced_config_map("dagster-instance", NAMESPACE).data["dagster.yaml"]
    )
    assert instance_yaml["run_launcher"]["class"] == "K8sRunLauncher"
    kubernetes = KubernetesClusters(kubeconfig=str(twin.kubeconfig), context_prefix="twin-")
    from dagster_graphql import DagsterGraphQLClientError

    with kubernetes.port_forward("studio", NAMESPACE, pod, _webserver_port(twin)) as port:
        client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60)
        run_id = client.submit_job_execution("up", op_selection=["cluster__forge"])
        status = wait(lambda: _finished(client, run_id, DagsterGraphQLClientError), timeout=600)
    assert status == "SUCCESS", status
    run_pods = _pods_of_jobs(core, f"dagster-run-{run_id}")
    assert run_pods and run_pods[0].spec.node_name == STUDIO_REAL_NODE
    step_pods = [
        p
        for p in _pods_of_jobs(core, "dagster-step-")
        if p.metadata.labels.get("dagster/run-id") == run_id
    ]
    assert [p.metadata.labels["dagster/op"] for p in step_pods] == ["cluster__forge"]
    logs = core.read_namespaced_pod_log(step_pods[0].metadata.name, NAMESPACE)
    assert "STEP_SUCCESS" in logs or "cluster__forge" in logs


def _finished(client, run_id: str, errors) -> str | None:
    try:
        status = client.get_run_status(run_id).value
    except errors:
        return None
    return status if status in {"SUCCESS", "FAILURE", "CANCELED"} else None


def _webserver_port(twin) -> int:
    from homelab_dagster.twin import service_port

    return service_port(twin.inventory, twin.api_port_base, 1)


def test_a_step_whose_pod_cannot_start_fails_with_the_pods_reason(pods_world, twin):
    """A step pod that can never start (its image cannot be pulled) leaves dagster-k8s's Job
    active for ever; the CLI's watch (resources/orchestrator.py, StepPodWatch) fails the
    step after its grace with the pod's reason, instead of a hang."""
    env = {
        **pods_world,
        "HOMELAB_RUNS": "kubernetes",
        "HOMELAB_IMAGE": "ghcr.io/homelab/homelab-dagster:no-such-tag",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "homelab_dagster", "up", "--env", "forge"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 1, printed
    print(f"failed after {time.monotonic() - started:.0f} s")
    assert "is waiting: ErrImagePull" in printed or "is waiting: ImagePullBackOff" in printed
    assert "no-such-tag" in printed and "was deleted" in printed, printed
    batch, _ = _batch_and_core(twin)

    def stuck_jobs_gone() -> bool:
        jobs = batch.list_namespaced_job(NAMESPACE).items
        return not [j for j in jobs if "no-such-tag" in str(j.spec.template.spec.containers)]

    assert wait(stuck_jobs_gone, timeout=60), "a stuck step's Job was left behind"


def test_a_stuck_step_of_a_run_the_cli_did_not_launch_is_failed_by_the_step_pods_sensor(
    pods_world, twin, monkeypatch
):
    """A run launched by something other than `homelab` (here Dagster's own `dagster job
    execute`; the UI, a schedule or a sensor alike) has no CLI watching its step pods: the
    daemon's ``step_pods`` sensor (sensors/steps.py) finds the stuck pod, deletes its Job, and
    notes the pod's reason in the run's log; the run fails instead of hanging, and the failure
    sensor's record of the asset carries the pod's reason."""
    import dagster as dg

    from homelab_dagster.cli.launch import ensure_dagster_home
    from homelab_dagster.loader import inventory_or_none
    from homelab_dagster.settings import Settings
    from resources.deployment import build_deployment
    from resources.orchestrator import POD_NOTE
    from sensors.failures import failed_assets
    from sensors.steps import fail_stuck_steps

    env = {
        **pods_world,
        "HOMELAB_RUNS": "kubernetes",
        "HOMELAB_IMAGE": "ghcr.io/homelab/homelab-dagster:no-such-tag",
    }
    settings = Settings.from_env(env)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    ensure_dagster_home(settings)  # the instance whose runs are pods, as `homelab` writes it
    deployment = build_deployment(settings, inventory_or_none(settings.inventory_path))
    assert deployment.steps_as_pods
    dok, kubernetes = (deployment.resources[k] for k in ("dagster_on_kubernetes", "kubernetes"))
    command = [
        sys.executable,
        "-m",
        "dagster",
        "job",
        "execute",
        "-m",
        "homelab_dagster.definitions",
        "-a",
        "defs",
    ]
    run = subprocess.Popen(
        [*command, "-j", "up", "-o", "cluster__forge"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            failed = wait(
                lambda: fail_stuck_steps(instance, dok, kubernetes, 10), timeout=300, interval=3
            )
            assert failed, "the stuck step was never found"
            [(run_id, steps)] = failed.items()
            assert list(steps) == ["cluster__forge"]
            printed, _ = run.communicate(timeout=300)
            assert run.returncode != 0, printed
            assert instance.get_run_by_id(run_id).status is dg.DagsterRunStatus.FAILURE
            notes = [
                r.event_log_entry.dagster_event.message
                for r in instance.get_records_for_run(
                    run_id, of_type=dg.DagsterEventType.ENGINE_EVENT
                ).records
                if (r.event_log_entry.dagster_event.message or "").startswith(POD_NOTE)
            ]
            assert len(notes) == 1 and "no-such-tag" in notes[0], notes
            assert "ErrImagePull" in notes[0] or "ImagePullBackOff" in notes[0], notes
            reason = failed_assets(instance, run_id)[dg.AssetKey(["cluster", "forge"])]
            assert "was deleted" in reason and "no-such-tag" in reason, reason
    finally:
        if run.poll() is None:
            run.kill()
