"""Dagster's own runs on Kubernetes: the settings every Dagster pod shares, in one place.

One resource, two configurations (``resources/deployment.py`` makes them):

- the homelab: pods reach the API in cluster (their ServiceAccount), the image is
  ``$HOMELAB_IMAGE``, the instance is PostgreSQL, the orchestrator is the official chart;
- the twin: pods run on the orchestrator cluster's real node (``twin: real`` in the
  inventory) with the project's image from the twin's registry; they share the host's
  network (the twin's API servers listen on loopback) and see the twin's state directory,
  the inventory and the toolchain at the same paths as on the host (``host_paths``), so a
  step in a pod finds the same Pulumi backend, kubeconfig and Dagster storage as a step
  in a local process. They reach the API through the cluster's own kubeconfig file.

From these settings come the ``k8s_job_executor``'s configuration (:meth:`executor_config`),
the ``K8sRunLauncher`` section of ``dagster.yaml`` (:meth:`instance_yaml`) and the
orchestrator stack's program inputs (:meth:`orchestrator_spec`): the run pods, the step
pods and the long-running pods are configured by the same dictionaries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import dagster as dg
import yaml
from pydantic import Field

from homelab_dagster.errors import KubernetesError
from homelab_dagster.serving import ObservedPod, crash_cause
from infra.orchestrator import INSTANCE_CONFIG_MAP, OrchestratorSpec
from resources.kubernetes import KubernetesClusters

__all__ = ["INSTANCE_CONCURRENCY", "DagsterOnKubernetes", "StepPodWatch", "step_pod_problem"]

# The ``concurrency`` section of every dagster.yaml this project writes: a step in a pool (the
# GPU steps, a pool per cluster: assets.training.gpu_pool) waits for a slot of it, and a pool
# with no limit of its own has one slot; steps in no pool are not limited.
INSTANCE_CONCURRENCY: dict[str, Any] = {"pools": {"default_limit": 1}}

# A container waiting for one of these waits for something that does not come by itself.
_STUCK_WAITING = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
)

_DAGSTER_HOME_IN_PODS = "/opt/dagster/dagster_home"


def step_pod_problem(pod: ObservedPod) -> tuple[str, bool] | None:
    """What is wrong with a step's pod, and whether it is stuck (it waits for something that
    does not come by itself: the step would hang) rather than ended; None: nothing."""
    if pod.unschedulable:
        return f"pod {pod.name} cannot be scheduled: {pod.unschedulable}", True
    if pod.waiting and pod.waiting.startswith(_STUCK_WAITING):
        return f"pod {pod.name} is waiting: {pod.waiting}", True
    if pod.phase == "Failed" or (pod.terminated and not pod.terminated.startswith("exit code 0")):
        return f"pod {pod.name} ended: {pod.terminated or pod.phase}", False
    return None


POD_NOTE = "step pod: "
"""How an engine event in a run's log that carries a step pod's reason begins (the
``step_pods`` sensor writes it; the failure sensor reads it back into the step's reason)."""


@dataclass
class StepPodWatch:
    """Watches a run's step pods (dagster-k8s's ``k8s_job_executor``), so that a step whose
    pod fails says why, and a step whose pod is stuck fails instead of hanging.

    dagster-k8s sees only its Job: a pod killed for memory fails the step with "Discovered
    failed Kubernetes job", and a pod that can never start (an image that cannot be pulled, a
    missing Secret, no node to place it) leaves the Job active, and the step waiting, for
    ever. :meth:`check` finds both: an ended pod's reason (exit code, ``OOMKilled``, its
    log's error lines), and a pod stuck and older than ``grace_s``, whose Job it deletes
    (dagster-k8s then fails the step: "Kubernetes job ... could not be found"). It keeps no
    state between checks (a pod's age counts from its creation time, as the API server
    recorded it), so a watch made afresh each time (the ``step_pods`` sensor) acts as one kept
    alive (the CLI's follower) does.
    """

    dagster: DagsterOnKubernetes
    kubernetes: KubernetesClusters
    run_id: str
    grace_s: float = 120.0
    said: dict[str, str] = field(default_factory=dict)  # step key -> the pod's reason

    def check(self, *, ended: bool = True) -> dict[str, str]:
        """The steps with news since the last check, each with what its pod says (``ended``:
        also the steps whose pod ended in failure; else only those it failed, stuck)."""
        cluster, namespace = self.dagster.cluster, self.dagster.namespace
        news: dict[str, str] = {}
        try:
            pods = self.kubernetes.labelled_pods(
                cluster, namespace, f"dagster/run-id={self.run_id}"
            )
        except KubernetesError:
            return news  # the API is unreachable for a moment: the next check asks again
        for labels, pod in pods:
            step, job = labels.get("dagster/op", ""), labels.get("job-name", "")
            problem = step_pod_problem(pod)
            if not step or problem is None or step in self.said or pod.deleting:
                continue
            reason, stuck = problem
            if not stuck:
                if ended:
                    log = self.kubernetes.pod_log(cluster, namespace, pod.name, tail=200)
                    cause = crash_cause(log) if log.strip() else ""
                    news[step] = f"{reason}{f'; its log says: {cause}' if cause else ''}"
                continue
            if pod.age_s >= self.grace_s and job:
                try:
                    self.kubernetes.delete_job(cluster, namespace, job)
                except KubernetesError:
                    continue  # gone already (another watch deleted it), or the API is away
                news[step] = f"{reason} (for {pod.age_s:.0f} s: its Job {job} was deleted)"
        self.said.update(news)
        return news


def _volume_name(path: str) -> str:
    return "host" + re.sub(r"[^a-z0-9]+", "-", path.lower()).rstrip("-")[:50]


class DagsterOnKubernetes(dg.ConfigurableResource):
    """Where and how Dagster's run and step pods run (dagster-k8s)."""

    cluster: str = Field(description="The orchestrator's cluster (inventory `orchestrator`).")
    namespace: str = Field(description="The namespace of Dagster's pods.")
    node_selector: dict[str, str] = Field(
        description="The labels of the nodes Dagster's pods run on (the inventory's role; on "
        "the twin, also its real nodes': a KWOK node runs nothing)."
    )
    image: str = Field(description="The project's image (a reference the nodes can pull).")
    image_pull_policy: str = Field(
        default="IfNotPresent",
        description="Always where a tag is rebuilt in place (the twin's registry: a lock file "
        "change keeps the tag, and the pull is a loopback round trip).",
    )
    service_account: str = "dagster"
    deploy: Literal["chart", "manifests"] = Field(
        description="How the orchestrator stack installs Dagster: the official Helm chart, "
        "or (where charts cannot be fetched) the same processes as plain Deployments."
    )
    chart_version: str = Field(description="The Dagster Helm chart's version.")
    webserver_port: int = 3000
    kubeconfig_file: str | None = Field(
        default=None, description="None: pods use their ServiceAccount (in-cluster config)."
    )
    host_network: bool = False
    host_paths: dict[str, bool] = Field(
        default_factory=dict,
        description="Host files and directories mounted at the same path in every pod: path -> "
        "writable.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Settings every pod gets (never secrets)."
    )
    env_secret: str | None = Field(
        default=None, description="A Secret whose keys every pod gets as variables (secrets)."
    )
    storage_yaml: str = Field(description="The `storage` section of the pods' dagster.yaml.")
    storage_root: str | None = Field(
        default=None,
        description="Where SQLite storage, artifacts and compute logs live when shared by "
        "path (the twin); None: PostgreSQL holds them.",
    )

    # ------------------------------------------------------------------ pod settings

    def pod(self) -> dict[str, Any]:
        """What every Dagster pod's spec says (Kubernetes' camelCase)."""
        pod: dict[str, Any] = {"nodeSelector": dict(self.node_selector)}
        if self.host_network:
            pod["hostNetwork"] = True
            pod["dnsPolicy"] = "ClusterFirstWithHostNet"
        if self.host_paths:
            pod["volumes"] = [
                {"name": _volume_name(p), "hostPath": {"path": p}} for p in sorted(self.host_paths)
            ]
        return pod

    def container(self) -> dict[str, Any]:
        """What every Dagster container says: its settings and mounts."""
        container: dict[str, Any] = {
            "env": [{"name": k, "value": v} for k, v in sorted(self.env.items())]
        }
        if self.env_secret:
            container["envFrom"] = [{"secretRef": {"name": self.env_secret}}]
        if self.host_paths:
            container["volumeMounts"] = [
                {"name": _volume_name(p), "mountPath": p, "readOnly": not writable}
                for p, writable in sorted(self.host_paths.items())
            ]
        return container

    def _k8s_config(self) -> dict[str, Any]:
        """``dagster-k8s/config`` for run and step pods: the shared pod and container."""
        pod = self.pod()
        container = self.container()
        return {
            "pod_spec_config": {
                **pod,
                "serviceAccountName": self.service_account,
            },
            "container_config": container,
        }

    def _api_access(self) -> dict[str, Any]:
        if self.kubeconfig_file:
            return {"load_incluster_config": False, "kubeconfig_file": self.kubeconfig_file}
        return {"load_incluster_config": True}

    # ------------------------------------------------------------------ dagster-k8s

    def executor_config(self, max_concurrent: int) -> dict[str, Any]:
        """``k8s_job_executor``'s configuration: each step a Job in the orchestrator's
        namespace with the project's image. The step pods' node selector, network, mounts
        and settings come from the instance's run launcher (:meth:`run_launcher`), which
        dagster-k8s merges into every step pod: they are stated once."""
        return {
            "job_namespace": self.namespace,
            "job_image": self.image,
            "image_pull_policy": self.image_pull_policy,
            "service_account_name": self.service_account,
            "max_concurrent": max_concurrent,
            **self._api_access(),
        }

    def run_launcher(self) -> dict[str, Any]:
        """The ``run_launcher`` section of ``dagster.yaml``: ``K8sRunLauncher``."""
        config: dict[str, Any] = {
            "job_namespace": self.namespace,
            "job_image": self.image,
            "image_pull_policy": self.image_pull_policy,
            "service_account_name": self.service_account,
            "instance_config_map": INSTANCE_CONFIG_MAP,
            "dagster_home": _DAGSTER_HOME_IN_PODS,
            "run_k8s_config": self._k8s_config(),
            **self._api_access(),
        }
        return {"module": "dagster_k8s.launcher", "class": "K8sRunLauncher", "config": config}

    def instance_yaml(self) -> str:
        """The ``dagster.yaml`` of an instance whose runs are pods: the host's (the CLI, the
        webserver) and the pods' (mounted from the orchestrator's ConfigMap) alike."""
        config: dict[str, Any] = {
            "telemetry": {"enabled": False},
            "nux": {"enabled": False},
            **yaml.safe_load(self.storage_yaml),
            "run_launcher": self.run_launcher(),
            "concurrency": INSTANCE_CONCURRENCY,
        }
        if self.deploy == "manifests":
            # No daemon runs in the cluster to take runs off a queue (the twin's daemon is its
            # host's, when `make dev` runs): the webserver launches each run when submitted.
            config["run_coordinator"] = {
                "module": "dagster._core.run_coordinator",
                "class": "DefaultRunCoordinator",
            }
        if self.storage_root:
            config["local_artifact_storage"] = {
                "module": "dagster._core.storage.root",
                "class": "LocalArtifactStorage",
                "config": {"base_dir": self.storage_root},
            }
            config["compute_logs"] = {
                "module": "dagster._core.storage.local_compute_log_manager",
                "class": "LocalComputeLogManager",
                "config": {"base_dir": f"{self.storage_root}/storage"},
            }
        return yaml.safe_dump(config, sort_keys=False)

    # ------------------------------------------------------------------ the orchestrator stack

    def orchestrator_spec(self) -> OrchestratorSpec:
        """The orchestrator stack's inputs (:mod:`infra.orchestrator`)."""
        return OrchestratorSpec(
            namespace=self.namespace,
            service_account=self.service_account,
            image=self.image,
            image_pull_policy=self.image_pull_policy,
            instance_yaml=self.instance_yaml(),
            deploy=self.deploy,
            chart_version=self.chart_version,
            webserver_port=self.webserver_port,
            pod=self.pod(),
            container=self.container(),
            postgres_secret=self.env_secret,
        )
