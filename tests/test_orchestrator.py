"""Dagster's own pods (resources/orchestrator.py): what dagster-k8s makes of our settings.

The Jobs are built by dagster-k8s itself (``construct_dagster_k8s_job``) from the run
launcher's configuration as ``dagster.yaml`` states it, so a key it does not take, or a
setting it drops, fails here rather than on a cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster_k8s.job import (
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
)

from homelab_dagster.errors import SettingsError
from homelab_dagster.settings import Settings
from infra.orchestrator import INSTANCE_CONFIG_MAP, RUN_ROLE_RULES, chart_values, webserver_args
from resources.deployment import build_deployment


def _settings(tmp_path: Path, project_root: Path, **env: str) -> Settings:
    return Settings.from_env(
        {
            "HOMELAB_STATE_DIR": str(tmp_path / "state"),
            "HOMELAB_INVENTORY": str(project_root / "homelab.yaml"),
            **env,
        }
    )


def _step_job(instance_yaml: str) -> dict:
    """The Job dagster-k8s makes for a step under this instance's run launcher."""
    launcher = yaml.safe_load(instance_yaml)["run_launcher"]
    assert launcher["class"] == "K8sRunLauncher"
    config = launcher["config"]
    job_config = DagsterK8sJobConfig(
        job_image=config["job_image"],
        dagster_home=config["dagster_home"],
        image_pull_policy=config["image_pull_policy"],
        service_account_name=config["service_account_name"],
        instance_config_map=config["instance_config_map"],
    )
    job = construct_dagster_k8s_job(
        job_config,
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-test",
        user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config["run_k8s_config"]),
    )
    return job.to_dict()


def test_on_the_twin_step_pods_run_on_the_real_node_and_see_the_twins_state(
    tmp_path, project_root, shipped_inventory
):
    settings = _settings(tmp_path, project_root, HOMELAB_RUNS="kubernetes")
    deployment = build_deployment(settings, shipped_inventory)
    assert deployment.executor.name == "k8s"
    assert deployment.instance_yaml is not None
    pod = _step_job(deployment.instance_yaml)["spec"]["template"]["spec"]

    assert pod["node_selector"] == {"role": "platform", "type": "real"}
    assert pod["host_network"] is True
    assert pod["service_account_name"] == "dagster"
    mounts = {m["mount_path"]: m["read_only"] for m in pod["containers"][0]["volume_mounts"]}
    state = str(settings.state_dir)
    assert mounts[state] is False  # Pulumi's backend, Dagster's storage, the kubeconfig
    assert mounts[str(settings.inventory_path)] is True
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["HOMELAB_STATE_DIR"] == state
    assert env["HOMELAB_RUNS"] == "kubernetes"
    assert env["DAGSTER_HOME"] == "/opt/dagster/dagster_home"
    # The instance the pods load is the host's own storage, by path.
    instance = yaml.safe_load(deployment.instance_yaml)
    assert instance["storage"]["sqlite"]["base_dir"] == f"{state}/dagster"
    assert instance["compute_logs"]["config"]["base_dir"] == f"{state}/dagster/storage"


def test_runs_stay_local_on_the_twin_unless_asked(tmp_path, project_root, shipped_inventory):
    deployment = build_deployment(_settings(tmp_path, project_root), shipped_inventory)
    assert deployment.executor.name != "k8s"
    assert deployment.instance_yaml is None


def test_pods_on_the_twin_cannot_share_a_postgres_url_they_would_need_as_plain_env(
    tmp_path, project_root, shipped_inventory
):
    settings = _settings(
        tmp_path,
        project_root,
        HOMELAB_RUNS="kubernetes",
        HOMELAB_DAGSTER_POSTGRES_URL="postgresql+psycopg2://u:canary-pw@127.0.0.1/d",
    )
    with pytest.raises(SettingsError, match="HOMELAB_RUNS") as raised:
        build_deployment(settings, shipped_inventory)
    assert "canary-pw" not in str(raised.value)


def test_bad_runs_setting_is_named(tmp_path, project_root):
    with pytest.raises(SettingsError, match="HOMELAB_RUNS='pods'"):
        _settings(tmp_path, project_root, HOMELAB_RUNS="pods")


def test_on_the_homelab_pods_use_their_service_account_and_secrets(
    tmp_path, project_root, shipped_inventory
):
    settings = _settings(tmp_path, project_root, HOMELAB_TARGET="homelab")
    deployment = build_deployment(settings, shipped_inventory)
    instance = yaml.safe_load(deployment.instance_yaml)
    launcher = instance["run_launcher"]["config"]
    assert launcher["load_incluster_config"] is True
    assert "kubeconfig_file" not in launcher
    assert instance["storage"]["postgres"]["postgres_url"] == {
        "env": "HOMELAB_DAGSTER_POSTGRES_URL"
    }
    pod = _step_job(deployment.instance_yaml)["spec"]["template"]["spec"]
    assert pod["node_selector"] == {"role": "platform"}
    assert not pod.get("host_network")
    assert not any(v.get("host_path") for v in pod.get("volumes") or [])
    container = pod["containers"][0]
    assert container["env_from"][0]["secret_ref"]["name"] == "homelab-dagster"
    assert container["image"] == "ghcr.io/homelab/homelab-dagster:0.1.0"


def test_the_homelab_chart_values_come_from_the_same_settings(
    tmp_path, project_root, shipped_inventory
):
    settings = _settings(
        tmp_path, project_root, HOMELAB_TARGET="homelab", HOMELAB_IMAGE="registry.lan/hd:7"
    )
    dagster = build_deployment(settings, shipped_inventory).resources["dagster_on_kubernetes"]
    spec = dagster.orchestrator_spec()
    assert spec.deploy == "chart"
    values = chart_values(spec)
    user_code = values["dagster-user-deployments"]["deployments"][0]
    assert user_code["image"] == {
        "repository": "registry.lan/hd",
        "tag": "7",
        "pullPolicy": "IfNotPresent",
    }
    assert user_code["dagsterApiGrpcArgs"] == ["-m", "homelab_dagster.definitions"]
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    assert launcher["config"]["k8sRunLauncher"]["jobNamespace"] == "dagster"
    assert values["postgresql"]["enabled"] is False
    assert values["serviceAccount"] == {"create": False, "name": "dagster"}


def test_the_run_role_lets_dagster_k8s_do_what_it_does():
    granted = {
        (group, resource, verb)
        for rule in RUN_ROLE_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # The run launcher and step executor create and follow Jobs, read their pods and logs.
    for need in [
        ("batch", "jobs", "create"),
        ("batch", "jobs", "get"),
        ("batch", "jobs", "delete"),
        ("", "pods", "list"),
        ("", "pods/log", "get"),
        ("", "events", "list"),
    ]:
        assert need in granted, need
    assert not any(v in {"*", "escalate", "bind"} for (_, _, v) in granted)
    assert INSTANCE_CONFIG_MAP == "dagster-instance"


def test_the_webserver_binds_loopback_only(tmp_path, project_root, shipped_inventory):
    settings = _settings(tmp_path, project_root)
    dagster = build_deployment(settings, shipped_inventory).resources["dagster_on_kubernetes"]
    spec = dagster.orchestrator_spec()
    assert spec.deploy == "manifests"
    args = webserver_args(spec)
    assert args[args.index("-h") + 1] == "127.0.0.1"
    # The twin's webserver shares the host's network: its port is the twin's, not 3000.
    assert args[args.index("-p") + 1] == str(spec.webserver_port) != "3000"


def _pod(**fields):
    from homelab_dagster.serving import ObservedPod

    base = {"name": "dagster-step-1", "digest": "", "node": None, "phase": "Pending"}
    return ObservedPod(**{**base, "ready": False, **fields})


@pytest.mark.parametrize(
    ("pod", "said", "stuck"),
    [
        (_pod(), None, None),
        (_pod(phase="Running", node="studio-platform-a"), None, None),
        (_pod(phase="Succeeded", terminated="exit code 0 (Completed)"), None, None),
        (
            _pod(waiting="ImagePullBackOff: Back-off pulling image x:nope"),
            "pod dagster-step-1 is waiting: ImagePullBackOff: Back-off pulling image x:nope",
            True,
        ),
        (
            _pod(waiting='CreateContainerConfigError: secret "homelab-dagster" not found'),
            "is waiting: CreateContainerConfigError",
            True,
        ),
        (
            _pod(unschedulable="0/8 nodes are available: 8 node(s) didn't match selector"),
            "cannot be scheduled: 0/8 nodes are available",
            True,
        ),
        (
            _pod(phase="Failed", terminated="exit code 137 (OOMKilled)"),
            "pod dagster-step-1 ended: exit code 137 (OOMKilled)",
            False,
        ),
        (_pod(waiting="CrashLoopBackOff: back-off 10s"), None, None),  # it restarts by itself
    ],
)
def test_what_a_step_pod_says(pod, said, stuck):
    from resources.orchestrator import step_pod_problem

    problem = step_pod_problem(pod)
    if said is None:
        assert problem is None
    else:
        assert problem is not None and said in problem[0] and problem[1] is stuck
