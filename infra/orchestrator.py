"""The Pulumi program of the orchestrator stack (``<target>.orchestrator``): Dagster itself,
on the orchestrator's cluster (``orchestrator:`` in the inventory, Studio by default).

Both targets get what Dagster's runs on Kubernetes need (dagster-k8s's ``K8sRunLauncher``
and ``k8s_job_executor``):

- the orchestrator's namespace;
- a ServiceAccount with the Role the run launcher and the step executor use (Jobs, Pods,
  their logs and events) bound to it;
- a ConfigMap holding the ``dagster.yaml`` that run and step pods load (the launcher mounts
  it as ``$DAGSTER_HOME``).

Then Dagster's long-running processes, two ways:

- ``chart``: the official Helm chart (``dagster/dagster``, the release matching the pinned
  ``dagster``), with values generated from the same settings (the user code deployment of
  this project's image, the run launcher, PostgreSQL from a Secret), where charts can be
  fetched (the homelab);
- ``manifests``: where they cannot (the twin), the webserver (with the code location in
  process, launching runs with ``K8sRunLauncher``) as a plain Deployment of the project's
  image. The twin's instance is shared with its host, whose daemon (``make dev``) evaluates
  schedules and sensors: a second daemon would evaluate them twice.

:func:`orchestrator_program` returns a zero-argument function: the inline program.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from infra.cluster import MANAGED_BY

__all__ = [
    "CHART",
    "INSTANCE_CONFIG_MAP",
    "RUN_ROLE_RULES",
    "OrchestratorSpec",
    "chart_values",
    "orchestrator_program",
    "webserver_args",
]

CHART = {"chart": "dagster", "repository": "https://dagster-io.github.io/helm"}
INSTANCE_CONFIG_MAP = "dagster-instance"
CODE_MODULE = "homelab_dagster.definitions"
# What dagster-k8s does with the API: the run launcher creates a Job per run, the step
# executor a Job per step; both follow their pods, read their logs and events.
RUN_ROLE_RULES: list[dict[str, list[str]]] = [
    {
        "apiGroups": ["batch"],
        "resources": ["jobs", "jobs/status"],
        "verbs": ["create", "delete", "get", "list", "watch", "patch", "update"],
    },
    {
        "apiGroups": [""],
        "resources": ["pods", "pods/log", "pods/status", "events"],
        "verbs": ["get", "list", "watch", "delete"],
    },
    {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get", "list"]},
]


@dataclass(frozen=True)
class OrchestratorSpec:
    """Everything the program declares, from the inventory and the deployment's settings.

    ``pod``: the pod settings every Dagster pod shares (``node_selector``, ``volumes``,
    ``host_network`` ... in Kubernetes' camelCase), ``container``: the container settings
    (``env``, ``volumeMounts``); ``instance_yaml``: the pods' ``dagster.yaml``.
    """

    namespace: str
    service_account: str
    image: str
    image_pull_policy: str
    instance_yaml: str
    deploy: Literal["chart", "manifests"]
    chart_version: str
    webserver_port: int
    pod: Mapping[str, Any] = field(default_factory=dict)
    container: Mapping[str, Any] = field(default_factory=dict)
    postgres_secret: str | None = None  # a Secret holding HOMELAB_DAGSTER_POSTGRES_URL


def chart_values(spec: OrchestratorSpec) -> dict[str, Any]:
    """The Helm values of the official chart for ``spec`` (the ``chart`` deployment)."""
    repository, _, tag = spec.image.rpartition(":")
    env = {e["name"]: e["value"] for e in spec.container.get("env", []) if "value" in e}
    postgres_env_from = (
        [{"secretRef": {"name": spec.postgres_secret}}] if spec.postgres_secret else []
    )
    return {
        "serviceAccount": {"create": False, "name": spec.service_account},
        "dagsterWebserver": {"nodeSelector": dict(spec.pod.get("nodeSelector", {}))},
        "dagsterDaemon": {"nodeSelector": dict(spec.pod.get("nodeSelector", {}))},
        "dagster-user-deployments": {
            "enabled": True,
            "deployments": [
                {
                    "name": "homelab",
                    "image": {
                        "repository": repository,
                        "tag": tag,
                        "pullPolicy": spec.image_pull_policy,
                    },
                    "dagsterApiGrpcArgs": ["-m", CODE_MODULE],
                    "port": 3030,
                    "env": env,
                    "envSecrets": [{"name": spec.postgres_secret}] if spec.postgres_secret else [],
                    "nodeSelector": dict(spec.pod.get("nodeSelector", {})),
                }
            ],
        },
        "runLauncher": {
            "type": "K8sRunLauncher",
            "config": {
                "k8sRunLauncher": {
                    "jobNamespace": spec.namespace,
                    "envVars": [f"{k}={v}" for k, v in env.items()],
                    "envSecrets": (
                        [{"name": spec.postgres_secret}] if spec.postgres_secret else []
                    ),
                    "runK8sConfig": {"podSpecConfig": dict(spec.pod)},
                }
            },
        },
        # Dagster's storage is the homelab's own PostgreSQL (docs/deploy.md), not the chart's.
        "postgresql": {"enabled": False},
        "generatePostgresqlPasswordSecret": False,
        "extraEnvFrom": postgres_env_from,
    }


def orchestrator_program(
    spec: OrchestratorSpec, *, cluster_identifier: str, kubeconfig: str, context: str
) -> Callable[[], None]:
    """The inline program of the orchestrator, reached through ``kubeconfig``/``context``."""

    def program() -> None:
        import pulumi
        import pulumi_kubernetes as k8s

        provider = k8s.Provider(
            "orchestrator",
            kubeconfig=kubeconfig,
            context=context,
            cluster_identifier=cluster_identifier,
            enable_server_side_apply=True,
        )
        opts = pulumi.ResourceOptions(provider=provider)
        namespace = k8s.core.v1.Namespace(
            "namespace",
            metadata={"name": spec.namespace, "labels": MANAGED_BY},
            # The cluster stack may declare the same namespace: take it as it is.
            opts=opts,
        )
        inside = pulumi.ResourceOptions(provider=provider, depends_on=[namespace])
        meta = {"namespace": spec.namespace, "labels": MANAGED_BY}
        account = k8s.core.v1.ServiceAccount(
            "service-account", metadata={"name": spec.service_account, **meta}, opts=inside
        )
        role = k8s.rbac.v1.Role(
            "run-role", metadata={"name": "dagster-runs", **meta}, rules=RUN_ROLE_RULES, opts=inside
        )
        k8s.rbac.v1.RoleBinding(
            "run-role-binding",
            metadata={"name": "dagster-runs", **meta},
            role_ref={
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "dagster-runs",
            },
            subjects=[
                {
                    "kind": "ServiceAccount",
                    "name": spec.service_account,
                    "namespace": spec.namespace,
                }
            ],
            opts=pulumi.ResourceOptions(provider=provider, depends_on=[role, account]),
        )
        instance = k8s.core.v1.ConfigMap(
            "instance",
            metadata={"name": INSTANCE_CONFIG_MAP, **meta},
            data={"dagster.yaml": spec.instance_yaml},
            opts=inside,
        )
        after = pulumi.ResourceOptions(provider=provider, depends_on=[account, instance])
        if spec.deploy == "chart":
            k8s.helm.v3.Release(
                "dagster",
                name="dagster",
                chart=CHART["chart"],
                version=spec.chart_version,
                namespace=spec.namespace,
                repository_opts={"repo": CHART["repository"]},
                values=chart_values(spec),
                opts=after,
            )
            workloads: list[str] = ["dagster (Helm release)"]
        else:
            # The webserver only: the daemon stays the one of the instance's host (`make dev`),
            # so that schedules and sensors are evaluated once per instance (docs/deploy.md).
            workloads = [
                _deployment(
                    spec,
                    k8s,
                    after,
                    "dagster-webserver",
                    webserver_args(spec),
                    probe=_server_info_probe(spec.webserver_port),
                )
            ]
        pulumi.export("namespace", spec.namespace)
        pulumi.export("service_account", spec.service_account)
        pulumi.export("image", spec.image)
        pulumi.export("workloads", workloads)
        pulumi.export("webserver_port", spec.webserver_port)

    return program


def webserver_args(spec: OrchestratorSpec) -> list[str]:
    # 127.0.0.1: the UI has no authentication (docs/deploy.md); reached by port-forward.
    return [
        "dagster-webserver",
        "-h",
        "127.0.0.1",
        "-p",
        str(spec.webserver_port),
        "-m",
        CODE_MODULE,
    ]


def _server_info_probe(port: int) -> dict[str, Any]:
    """Asks the webserver for ``/server_info`` from inside the pod: it listens on the pod's
    loopback only, where the kubelet's HTTP probes (to the pod's address) cannot reach."""
    script = (
        "import urllib.request; "
        f"urllib.request.urlopen('http://127.0.0.1:{port}/server_info', timeout=5)"
    )
    return {"exec": {"command": ["python3", "-c", script]}, "timeoutSeconds": 10}


def _deployment(
    spec: OrchestratorSpec,
    k8s: Any,
    opts: Any,
    name: str,
    command: Sequence[str],
    *,
    probe: dict[str, Any] | None = None,
) -> str:
    """A one-replica Deployment of the project's image running ``command`` as Dagster's pods
    run (the same pod settings, the instance from the ConfigMap)."""
    labels = {"app.kubernetes.io/name": name, **MANAGED_BY}
    container = dict(spec.container)
    mounts = [
        *container.pop("volumeMounts", []),
        {"name": "dagster-instance", "mountPath": "/opt/dagster/dagster_home"},
    ]
    env = [
        *container.pop("env", []),
        {"name": "DAGSTER_HOME", "value": "/opt/dagster/dagster_home"},
    ]
    pod = dict(spec.pod)
    volumes = [
        *pod.pop("volumes", []),
        {"name": "dagster-instance", "configMap": {"name": INSTANCE_CONFIG_MAP}},
    ]
    k8s.apps.v1.Deployment(
        name,
        metadata={
            "name": name,
            "namespace": spec.namespace,
            "labels": labels,
            # Pulumi waits for the rollout; a pod that never serves fails the update in 10 min.
            "annotations": {"pulumi.com/timeoutSeconds": "600"},
        },
        spec={
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            # One at a time: a new pod starts when the old one has stopped.
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {
                    "labels": labels,
                    # A new dagster.yaml rolls the pods (they read it when they start).
                    "annotations": {
                        "homelab.dev/instance-sha256": hashlib.sha256(
                            spec.instance_yaml.encode()
                        ).hexdigest()
                    },
                },
                "spec": {
                    **pod,
                    "serviceAccountName": spec.service_account,
                    "terminationGracePeriodSeconds": 15,
                    "volumes": volumes,
                    "containers": [
                        {
                            "name": name,
                            "image": spec.image,
                            "imagePullPolicy": spec.image_pull_policy,
                            "command": list(command),
                            **container,
                            "env": env,
                            "volumeMounts": mounts,
                            **_probes(probe),
                        }
                    ],
                },
            },
        },
        opts=opts,
    )
    return name


def _probes(probe: dict[str, Any] | None) -> dict[str, Any]:
    """Startup (loading the code location takes minutes on a busy machine) and readiness."""
    if probe is None:
        return {}
    return {
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 60},
        "readinessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 3},
    }
