"""The Pulumi program of an endpoint stack (``<target>.vllm_endpoint.<name>``).

One stack per endpoint, on the endpoint's cluster, in its namespace:

- a Deployment running vLLM's OpenAI-compatible server (``python3 -m
  vllm.entrypoints.openai.api_server``) with the served names, ``--tensor-parallel-size``,
  ``--max-model-len`` and the other serving arguments of the inventory; GPU limits equal to the
  tensor-parallel size; a node selector on the endpoint's node role and tolerations for the
  taints of those nodes (and the usual ``nvidia.com/gpu`` taint); a startup probe long enough
  for model loading, then a readiness probe; strategy ``Recreate`` (a rolling update would
  need the GPUs twice: on a node with exactly the endpoint's GPUs the new pod could never be
  scheduled);
- the weights version read-only at ``/models/<digest>``, on both targets: an init container
  copies it from the store's bucket into an ``emptyDir`` and verifies every file and the
  tree's digest before the server starts (:class:`WeightsSource`,
  :mod:`resources.weights_copy`); its keys are in a Secret the stack manages (the twin's
  generated keys, as Pulumi secrets; on the homelab an ``ExternalSecret``);
- ``/dev/shm`` as a memory ``emptyDir`` (vLLM's engine needs more than a container's 64 MiB);
- where the endpoint has a chat template, a ConfigMap holding it, mounted at
  ``/etc/vllm/`` (outside the weights: their digest is unchanged);
- a Service with the inventory's NodePort, labelled for the mesh's export when
  ``export_to_mesh`` (Linkerd mirrors it on the linked clusters as ``<name>-<cluster>``:
  docs/serving.md).

The Deployment and the Service carry ``pulumi.com/skipAwait``: the endpoint asset waits for
the rollout itself, through the Kubernetes API, so that a pod the scheduler refuses fails in
the scheduler's words instead of after Pulumi's ten-minute timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from homelab_dagster.inventory import Cluster, Endpoint

__all__ = [
    "CHAT_TEMPLATE_PATH",
    "CONTAINER",
    "COPY_CONTAINER",
    "GPU_RESOURCE",
    "MODELS_DIR",
    "SERVER_PORT",
    "ExternalKeys",
    "ServedWeights",
    "ServerRuntime",
    "StoreKeys",
    "WeightsSource",
    "endpoint_labels",
    "endpoint_program",
    "served_names",
    "server_args",
    "service_url",
    "weights_secret",
]

GPU_RESOURCE = "nvidia.com/gpu"
SERVER_PORT = 8000
CONTAINER = "vllm"
COPY_CONTAINER = "fetch-weights"
MODELS_DIR = "/models"
CHAT_TEMPLATE_PATH = "/etc/vllm/chat-template.jinja"
# Model loading: up to 15 minutes (a 70B model from local disk; vLLM's CPU build under load
# takes minutes for a tiny one), probed every 10 s; then ready is probed every 10 s.
_STARTUP_PERIOD_S, _STARTUP_FAILURES = 10, 90
_MANAGED_BY = {"app.kubernetes.io/managed-by": "homelab-dagster"}
_SHM_SIZE = "1Gi"


@dataclass(frozen=True)
class ServedWeights:
    """The weights version the endpoint serves: its digest and its directory in the store.

    ``digest`` None: the store holds no version of the model (an external model on the twin);
    the server then runs ``--model <model_id>`` (the hub id), which only the homelab can reach.
    """

    digest: str | None
    relative_path: str = ""  # <model>/versions/<digest>, below the store's root
    model_id: str = ""


@dataclass(frozen=True)
class StoreKeys:
    """The store's keys as values (the twin's generated ones): the stack puts them in the
    copy step's Secret as Pulumi secrets (encrypted in the stack's state). Never printed."""

    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)


@dataclass(frozen=True)
class ExternalKeys:
    """The store's keys through External Secrets (the homelab): the stack declares an
    ``ExternalSecret`` that makes the copy step's Secret from ``remote_key`` of the
    ``ClusterSecretStore`` ``store`` (its properties ``access_key`` and ``secret_key``)."""

    store: str = "homelab"
    remote_key: str = "weights-store"


@dataclass(frozen=True)
class WeightsSource:
    """Where the server's pod gets the store's versions: the init container ``fetch-weights``
    (:mod:`resources.weights_copy`, in ``copy_image``) copies one from ``bucket_url``
    (``s3://bucket``) at ``endpoint_url`` (as pods reach it) into an ``emptyDir``, verifying
    it; its keys come from the endpoint's Secret (:func:`weights_secret`), made from ``keys``."""

    bucket_url: str = ""
    endpoint_url: str = ""
    copy_image: str = ""
    keys: StoreKeys | ExternalKeys = field(default_factory=ExternalKeys)


def weights_secret(endpoint_name: str) -> str:
    """The Secret holding the copy step's keys: one per endpoint, each managed by its own
    stack (two stacks applying one object would conflict)."""
    return f"{endpoint_name}-weights-store"


@dataclass(frozen=True)
class ServerRuntime:
    """What the deployment's vLLM needs besides the inventory: its image (None: the
    endpoint's), runtime arguments and environment (vLLM's CPU build on the twin), the memory
    its container requests, and where the weights are."""

    image: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    memory: str | None = None
    weights: WeightsSource = field(default_factory=WeightsSource)

    def image_of(self, endpoint: Endpoint) -> str:
        """The image ``endpoint``'s server pods run: this runtime's, else the inventory's."""
        return self.image or endpoint.image


def served_names(endpoint_name: str, endpoint: Endpoint, digest: str | None) -> list[str]:
    """The names ``/v1/models`` lists: the stable name, and ``<name>@<digest[:12]>``, which
    says which weights version answers."""
    name = endpoint.served_model_name(endpoint_name)
    return [name, f"{name}@{digest[:12]}"] if digest else [name]


def endpoint_labels(endpoint_name: str) -> dict[str, str]:
    """The labels of the endpoint's pods (the Service's selector)."""
    return {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": endpoint_name}


def server_args(
    endpoint_name: str, endpoint: Endpoint, weights: ServedWeights, runtime: ServerRuntime
) -> list[str]:
    """The server's command line: module, model, served names, parallelism, length, port."""
    model = f"{MODELS_DIR}/{weights.digest}" if weights.digest else weights.model_id
    args = [
        "python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        *served_names(endpoint_name, endpoint, weights.digest),
        "--tensor-parallel-size",
        str(endpoint.tensor_parallel_size),
        "--max-model-len",
        str(endpoint.max_model_len),
        "--host",
        "0.0.0.0",
        "--port",
        str(SERVER_PORT),
    ]
    if endpoint.chat_template:
        args += ["--chat-template", CHAT_TEMPLATE_PATH]
    return [*args, *runtime.args, *endpoint.extra_args]


def _weights_volume(
    endpoint_name: str, weights: ServedWeights, source: WeightsSource
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, init containers) that put the version at ``/models/<digest>``: an
    ``emptyDir`` the copy step fills from the store, verified, before the server starts."""
    if not weights.digest:
        return [], []
    copy = {
        "name": COPY_CONTAINER,
        "image": source.copy_image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "python",
            "-m",
            "resources.weights_copy",
            *(["--endpoint-url", source.endpoint_url] if source.endpoint_url else []),
            f"{source.bucket_url.rstrip('/')}/{weights.relative_path}",
            f"{MODELS_DIR}/{weights.digest}",
        ],
        "envFrom": [{"secretRef": {"name": weights_secret(endpoint_name)}}],
        # Its last line (the file that did not verify) becomes the pod's termination message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "weights", "mountPath": f"{MODELS_DIR}/{weights.digest}"}],
    }
    return [{"name": "weights", "emptyDir": {}}], [copy]


def _credentials(
    k8s: Any, pulumi: Any, meta: dict[str, Any], name: str, source: WeightsSource, opts: Any
) -> None:
    """The copy step's Secret ``name``: from the twin's keys (Pulumi secrets), or an
    ExternalSecret."""
    if isinstance(source.keys, StoreKeys):
        k8s.core.v1.Secret(
            "weights-credentials",
            metadata={**meta, "name": name},
            string_data={
                "AWS_ACCESS_KEY_ID": pulumi.Output.secret(source.keys.access_key),
                "AWS_SECRET_ACCESS_KEY": pulumi.Output.secret(source.keys.secret_key),
            },
            opts=opts,
        )
        return
    k8s.apiextensions.CustomResource(
        "weights-credentials",
        api_version="external-secrets.io/v1beta1",
        kind="ExternalSecret",
        metadata={**meta, "name": name},
        spec={
            "refreshInterval": "1h",
            "secretStoreRef": {"kind": "ClusterSecretStore", "name": source.keys.store},
            "target": {"name": name},
            "data": [
                {
                    "secretKey": variable,
                    "remoteRef": {"key": source.keys.remote_key, "property": prop},
                }
                for variable, prop in (
                    ("AWS_ACCESS_KEY_ID", "access_key"),
                    ("AWS_SECRET_ACCESS_KEY", "secret_key"),
                )
            ],
        },
        opts=opts,
    )


def pod_spec(
    endpoint_name: str,
    endpoint: Endpoint,
    cluster: Cluster,
    weights: ServedWeights,
    runtime: ServerRuntime,
) -> dict[str, Any]:
    """The server's pod: the part of the program that the fast tests read."""
    volumes, init = _weights_volume(endpoint_name, weights, runtime.weights)
    mounts: list[dict[str, Any]] = [
        {"name": "weights", "mountPath": f"{MODELS_DIR}/{weights.digest}", "readOnly": True}
        for _ in volumes  # none for a model served from its hub id
    ]
    # vLLM's engine and workers talk through shared memory (160 MiB and more); a container's
    # /dev/shm is 64 MiB by default, and the engine then refuses to start.
    volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": _SHM_SIZE}})
    mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    if endpoint.chat_template:
        volumes.append(
            {"name": "chat-template", "configMap": {"name": f"{endpoint_name}-chat-template"}}
        )
        mounts.append({"name": "chat-template", "mountPath": CHAT_TEMPLATE_PATH.rsplit("/", 1)[0]})
    gpus = {GPU_RESOURCE: str(endpoint.gpus)} if endpoint.gpus else {}
    probe = {"httpGet": {"path": "/health", "port": SERVER_PORT}, "periodSeconds": 10}
    container = {
        "name": CONTAINER,
        "image": runtime.image_of(endpoint),
        "imagePullPolicy": "IfNotPresent",
        "command": server_args(endpoint_name, endpoint, weights, runtime),
        "env": [{"name": k, "value": v} for k, v in sorted(runtime.env.items())],
        "ports": [{"name": "http", "containerPort": SERVER_PORT}],
        "resources": {
            "limits": gpus,
            "requests": {**gpus, **({"memory": runtime.memory} if runtime.memory else {})},
        },
        "startupProbe": {**probe, "failureThreshold": _STARTUP_FAILURES},
        "readinessProbe": {**probe, "failureThreshold": 3},
        "volumeMounts": mounts,
    }
    return {
        "nodeSelector": {"role": endpoint.node_role},
        "tolerations": cluster.tolerations(endpoint.node_role),
        "automountServiceAccountToken": False,
        # No service variables in the environment: a Service named ``vllm`` would become
        # VLLM_PORT=tcp://..., which vLLM reads as its own setting and refuses to start.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        "initContainers": init,
        "containers": [container],
        "volumes": volumes,
    }


def service_url(endpoint_name: str, endpoint: Endpoint) -> str:
    """The OpenAI-compatible API's base URL inside the endpoint's cluster (its Service)."""
    return f"http://{endpoint_name}.{endpoint.namespace}.svc.cluster.local:{SERVER_PORT}/v1"


def endpoint_program(
    endpoint_name: str,
    endpoint: Endpoint,
    cluster: Cluster,
    weights: ServedWeights,
    runtime: ServerRuntime,
    *,
    kubeconfig: str,
    context: str,
    cluster_identifier: str,
    export_label: str,
    replicas: int | None = None,
    history: list[str] | None = None,
) -> Callable[[], None]:
    """The inline program of endpoint ``endpoint_name`` serving ``weights``.

    ``replicas``: None for the inventory's; 0 keeps the Deployment with no pod (an external
    model on the twin, once its scheduling is proven). ``history``: the digests served so
    far, oldest first, exported with the stack (``homelab rollback`` reads it).
    """
    labels = endpoint_labels(endpoint_name)
    spec = pod_spec(endpoint_name, endpoint, cluster, weights, runtime)
    service_labels = {**labels, **_MANAGED_BY}
    if endpoint.export_to_mesh:
        service_labels[export_label] = "true"

    def program() -> None:
        import pulumi
        import pulumi_kubernetes as k8s

        provider = k8s.Provider(
            f"{endpoint.cluster}-{endpoint_name}",
            kubeconfig=kubeconfig,
            context=context,
            cluster_identifier=cluster_identifier,
            enable_server_side_apply=True,
        )
        opts = pulumi.ResourceOptions(provider=provider)
        meta = {"namespace": endpoint.namespace, "labels": {**labels, **_MANAGED_BY}}
        if weights.digest:
            _credentials(k8s, pulumi, meta, weights_secret(endpoint_name), runtime.weights, opts)
        if endpoint.chat_template:
            k8s.core.v1.ConfigMap(
                "chat-template",
                metadata={**meta, "name": f"{endpoint_name}-chat-template"},
                data={CHAT_TEMPLATE_PATH.rsplit("/", 1)[1]: endpoint.chat_template},
                opts=opts,
            )
        annotations = {
            "pulumi.com/skipAwait": "true",
            "homelab.dev/weights-digest": weights.digest or "",
        }
        deployment = k8s.apps.v1.Deployment(
            "server",
            metadata={**meta, "name": endpoint_name, "annotations": annotations},
            spec={
                "replicas": endpoint.replicas if replicas is None else replicas,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {"homelab.dev/weights-digest": weights.digest or ""},
                    },
                    "spec": spec,
                },
            },
            opts=opts,
        )
        port: dict[str, Any] = {"name": "http", "port": SERVER_PORT, "targetPort": SERVER_PORT}
        if endpoint.node_port is not None:
            port["nodePort"] = endpoint.node_port
        service = k8s.core.v1.Service(
            "service",
            metadata={
                **meta,
                "name": endpoint_name,
                "labels": service_labels,
                "annotations": {"pulumi.com/skipAwait": "true"},  # its pods: awaited above
            },
            spec={
                "type": "NodePort" if endpoint.node_port is not None else "ClusterIP",
                "selector": labels,
                "ports": [port],
            },
            opts=opts,
        )
        pulumi.export("deployment", deployment.metadata["name"])
        pulumi.export("service", service.metadata["name"])
        pulumi.export("namespace", endpoint.namespace)
        pulumi.export("weights_digest", weights.digest or "")
        pulumi.export("served_names", served_names(endpoint_name, endpoint, weights.digest))
        pulumi.export("node_port", endpoint.node_port)
        pulumi.export("history", list(history or []))

    return program
