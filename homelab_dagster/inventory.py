"""The homelab's inventory: one validated model of clusters, mesh, models, runs and endpoints.

``homelab.yaml`` is parsed into :class:`Inventory`. The model checks shapes and types
(unknown keys are errors); the rules that span entries (overlapping networks, ports,
GPU fit, references) live in :mod:`homelab_dagster.rules`, and
:func:`homelab_dagster.loader.load_inventory` runs both and reports every problem at once.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

__all__ = [
    "NAME_RULES",
    "Cluster",
    "Component",
    "Distribution",
    "Endpoint",
    "GpuSpec",
    "Inventory",
    "MeshLink",
    "Model",
    "ModelArchitecture",
    "Network",
    "Node",
    "NodePool",
    "NodePort",
    "Taint",
    "TrainingHyperparameters",
    "TrainingRun",
    "WeightsDtype",
    "check_corpus_glob",
]

_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_MODEL_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_PARAMETERS = r"^[0-9]+(\.[0-9]+)?[KMBT]$"
# RFC 1123 label names, as Kubernetes requires of namespaces, nodes and services. Names
# also name files and directories (the twin's, the stacks'), so no path separator passes.
Name = Annotated[str, StringConstraints(pattern=_NAME, max_length=63)]
# Model names may carry a version with dots (llama-3.1-70b-instruct).
ModelName = Annotated[str, StringConstraints(pattern=_MODEL_NAME, max_length=63)]
# What a value that does not match a pattern says, by pattern (the loader's problems use it).
NAME_RULES = {
    _NAME: "not a valid Kubernetes name (an RFC 1123 label: lowercase letters, digits and "
    "'-', starting and ending with a letter or digit, at most 63 characters; no '/' or '.')",
    _MODEL_NAME: "not a valid model name (lowercase letters, digits, '-' and '.', starting "
    "and ending with a letter or digit, at most 63 characters; no '/')",
    _PARAMETERS: "not a parameter count (a number and K, M, B or T, e.g. 270M or 70.6B)",
}
Quantity = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")]
# A model's size: 270M, 70B, 70.6B (K, M, B, T: thousands to trillions of parameters).
ParameterCount = Annotated[str, StringConstraints(pattern=_PARAMETERS)]
_PARAMETER_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
# The precision of served weights (homelab_dagster.gpus.SERVING_BYTES_PER_PARAMETER sizes each).
WeightsDtype = Literal["bf16", "fp16", "fp8", "int8", "int4"]

_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def check_label(key: str, value: str) -> str | None:
    """Return why ``key: value`` is not a valid Kubernetes label, or None when it is."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _LABEL_PREFIX.match(prefix)):
        return f"label key {key!r} has an invalid prefix (a DNS subdomain is required)"
    if not _LABEL_NAME.match(name):
        return f"label key {key!r} is invalid (at most 63 characters: alphanumerics, '-', '_', '.')"
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return (
            f"label value {value!r} of {key!r} is invalid (at most 63 characters: "
            "alphanumerics, '-', '_', '.', starting and ending with an alphanumeric)"
        )
    return None


def check_corpus_glob(pattern: str) -> str | None:
    """Return why corpus glob ``pattern`` could leave the project, or None when it stays below
    it (relative, no ``..``, no backslash). Links out are caught when the corpus resolves."""
    pure = PurePosixPath(pattern)
    if pure.is_absolute():
        return f"corpus glob {pattern!r} is absolute: a glob is relative to the project"
    if pattern.startswith("~") or "\\" in pattern:
        return (
            f"corpus glob {pattern!r} starts at a home directory or holds a '\\': a glob is "
            "relative to the project, with '/' between its parts"
        )
    if ".." in pure.parts:
        return f"corpus glob {pattern!r} leaves the project ('..'): a glob must stay below it"
    return None


class _Strict(BaseModel):
    """Base of every inventory model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Distribution(StrEnum):
    """How a cluster's Kubernetes is distributed."""

    KIND = "kind"
    K3S = "k3s"


class Taint(_Strict):
    """A node taint, as ``kubectl taint`` would set it."""

    key: str = Field(description="Taint key, e.g. node-role.kubernetes.io/control-plane.")
    value: str = Field(default="", description="Taint value (may be empty).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        description="What the scheduler does with pods that do not tolerate it."
    )

    def manifest(self) -> dict[str, str]:
        """The taint as the Node API writes it: ``key``, ``effect``, and ``value`` when set.

        The one place a taint is serialised (the twin's nodes, the cluster program's node
        patches, and the comparison of a live node with the inventory all use it).
        """
        return {
            "key": self.key,
            **({"value": self.value} if self.value else {}),
            "effect": self.effect,
        }


class GpuSpec(_Strict):
    """The GPUs of one node: how many and which product (the device plugin's label value)."""

    count: int = Field(ge=1, description="GPUs on the node (its nvidia.com/gpu capacity).")
    product: str = Field(
        description="The nvidia.com/gpu.product label, e.g. NVIDIA-A100-SXM4-40GB."
    )


class NodePool(_Strict):
    """One or more identical nodes. ``count`` > 1 names them ``<name>-1`` … ``<name>-<count>``."""

    name: Name = Field(description="Node name, or the stem of the names when count > 1.")
    role: str = Field(description="The `role` label: control-plane, platform, training, ...")
    count: int = Field(default=1, ge=1, description="How many identical nodes.")
    cpu: int = Field(ge=1, description="CPU cores per node.")
    memory: Quantity = Field(description="Memory per node, as a Kubernetes quantity (e.g. 64Gi).")
    gpu: GpuSpec | None = Field(default=None, description="GPUs, on GPU nodes only.")
    zone: str | None = Field(default=None, description="topology.kubernetes.io/zone label.")
    labels: dict[str, str] = Field(
        default_factory=dict, description="More labels: tier, resource-profile, criticality."
    )
    taints: list[Taint] = Field(default_factory=list, description="Node taints.")
    twin: Literal["fake", "real"] = Field(
        default="fake",
        description="How the twin runs it: fake (a KWOK node) or real (a real kubelet and "
        "containerd on the machine running the twin; only the first node of a pool).",
    )


class Node(BaseModel):
    """A single node after its pool is expanded; labels include the derived ones."""

    model_config = ConfigDict(frozen=True)

    name: str
    role: str
    cpu: int
    memory: str
    gpus: int
    gpu_product: str | None
    labels: dict[str, str]
    taints: list[Taint]
    twin: Literal["fake", "real"] = "fake"


class Network(_Strict):
    """A cluster's address plan: pods and services must not overlap any other cluster's."""

    pod_cidr: ipaddress.IPv4Network = Field(description="Pod range (cluster CIDR).")
    service_cidr: ipaddress.IPv4Network = Field(description="Service cluster-IP range.")


class NodePort(_Strict):
    """A NodePort allocated to a service, in one of the port plan's categories."""

    port: int = Field(ge=1, le=65535, description="The NodePort.")
    category: str = Field(description="A key of port_ranges; the port must lie in its range.")
    namespace: str | None = Field(default=None, description="The service's namespace.")


class Cluster(_Strict):
    """One Kubernetes cluster of the homelab."""

    distribution: Distribution = Field(description="kind (on the Mac Studio) or k3s.")
    kubernetes_version: Annotated[str, StringConstraints(pattern=r"^v\d+\.\d+(\.\d+)?$")] = Field(
        description="The version the homelab runs, e.g. v1.34.0 (the twin runs its pinned one)."
    )
    host: str = Field(description="The machine the cluster runs on; Kind clusters share one.")
    api_port: int = Field(ge=1, le=65535, description="The API server's port on its host.")
    purpose: str = Field(default="", description="What the cluster is for, in words.")
    network: Network = Field(description="Pod and service ranges.")
    nodes: list[NodePool] = Field(min_length=1, description="Node pools.")
    namespaces: list[Name] = Field(
        default_factory=list, description="Namespaces the cluster's stack creates."
    )
    components: list[str] = Field(
        default_factory=list, description="Names of entries of the top-level components."
    )
    node_ports: dict[str, NodePort] = Field(
        default_factory=dict, description="NodePorts allocated to services, by service name."
    )
    k3s_flags: list[str] = Field(default_factory=list, description="k3s server flags (k3s only).")
    quotas: dict[Name, dict[str, Quantity]] = Field(
        default_factory=dict,
        description="ResourceQuota hard limits by namespace (a declared namespace), e.g. "
        "{ml-training: {requests.nvidia.com/gpu: '4'}}.",
    )

    def expanded_nodes(self) -> list[Node]:
        """Every node of the cluster, pools expanded, with its derived labels."""
        nodes = []
        for pool in self.nodes:
            for i in range(1, pool.count + 1):
                labels = {"role": pool.role, **pool.labels}
                if pool.zone:
                    labels["topology.kubernetes.io/zone"] = pool.zone
                if pool.gpu:
                    labels.setdefault("gpu-type", "nvidia")
                    labels["nvidia.com/gpu.product"] = pool.gpu.product
                    labels["nvidia.com/gpu.count"] = str(pool.gpu.count)
                nodes.append(
                    Node(
                        name=pool.name if pool.count == 1 else f"{pool.name}-{i}",
                        role=pool.role,
                        cpu=pool.cpu,
                        memory=pool.memory,
                        gpus=pool.gpu.count if pool.gpu else 0,
                        gpu_product=pool.gpu.product if pool.gpu else None,
                        labels=labels,
                        taints=list(pool.taints),
                        # A pool of several nodes: only its first runs real on the twin.
                        twin=pool.twin if i == 1 else "fake",
                    )
                )
        return nodes

    def gpu_total(self) -> int:
        """GPUs over all nodes."""
        return sum(n.gpus for n in self.expanded_nodes())

    def tolerations(self, role: str) -> list[dict[str, str]]:
        """What a pod for the ``role`` nodes tolerates: every taint of those nodes, and the GPU
        operator's usual ``nvidia.com/gpu`` taint (the endpoints' and training pods' rule)."""
        gpu = "nvidia.com/gpu"
        seen = {(gpu, "NoSchedule"): {"key": gpu, "operator": "Exists", "effect": "NoSchedule"}}
        for node in self.expanded_nodes():
            if node.role == role:
                for taint in node.taints:
                    toleration = {"key": taint.key, "operator": "Exists", "effect": taint.effect}
                    seen.setdefault((taint.key, taint.effect), toleration)
        return list(seen.values())


class Component(_Strict):
    """A third-party component installed as a Helm release (skipped, visibly, on the twin)."""

    chart: str = Field(description="Helm chart name.")
    repository: str = Field(description="Helm repository URL.")
    version: str = Field(description="Chart version, pinned.")
    namespace: Name = Field(description="Namespace of the release.")
    values: dict[str, object] = Field(default_factory=dict, description="Helm values.")


class MeshLink(_Strict):
    """``source`` reaches the services that ``target`` exports (Linkerd multicluster).

    The link lives on the source: it mirrors the target's exported services as
    ``<service>-<target>``.
    """

    source: Name = Field(alias="from", description="The cluster that reaches out.")
    target: Name = Field(alias="to", description="The cluster whose exported services it reaches.")
    latency_ms: tuple[float, float] | None = Field(
        default=None, description="Measured latency range between the sites, for docs and metadata."
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def key(self) -> str:
        """The link's name in asset keys and stack names: ``<from>__<to>``."""
        return f"{self.source}__{self.target}"


class Mesh(_Strict):
    """The Linkerd multicluster mesh."""

    transport: str = Field(default="warp", description="warp (phase 1) or wireguard (phase 2).")
    export_label: str = Field(
        default="mirror.linkerd.io/exported", description="The label that exports a service."
    )
    links: list[MeshLink] = Field(default_factory=list, description="The links.")


class ModelArchitecture(_Strict):
    """A GPT-2-style architecture trained from scratch (the twin's tiny model)."""

    family: Literal["gpt2"] = Field(default="gpt2", description="Model family.")
    n_layer: int = Field(ge=1, description="Transformer blocks.")
    n_head: int = Field(ge=1, description="Attention heads.")
    n_embd: int = Field(ge=8, description="Hidden size.")
    n_positions: int = Field(ge=16, description="Longest sequence.")
    vocab_size: int = Field(ge=260, description="Tokenizer vocabulary, trained on the corpus.")


class Model(_Strict):
    """A model whose weights the homelab keeps: trained here, or observed from outside."""

    source: Literal["trained", "external"] = Field(
        description="trained here (by a training run) or external (observed, never trained)."
    )
    base_model: str | None = Field(
        default=None, description="Hugging Face id of the base (external: what is served)."
    )
    architecture: ModelArchitecture | None = Field(
        default=None, description="What the twin trains from scratch on the CPU."
    )
    format: Literal["safetensors"] = Field(default="safetensors", description="Weights format.")
    parameters: ParameterCount | None = Field(
        default=None,
        description="Size: a number and K, M, B or T, e.g. 270M or 70.6B (what the GPU fit "
        "rule weighs; a trained model with a base_model has the base's).",
    )
    dtype: WeightsDtype = Field(
        default="bf16",
        description="Precision of the weights vLLM serves (the checkpoint's; 32-bit ones are "
        "served in 16 bits): bf16 or fp16 take 2 bytes a parameter, fp8 or int8 1, int4 (an "
        "AWQ or GPTQ 4-bit checkpoint) 0.5.",
    )

    @property
    def parameter_count(self) -> int | None:
        """``parameters`` as a number (``70.6B`` -> 70_600_000_000), or None when unset."""
        if self.parameters is None:
            return None
        return round(float(self.parameters[:-1]) * _PARAMETER_UNITS[self.parameters[-1]])


class TrainingHyperparameters(_Strict):
    """What a training run does; part of its identity (a change trains a new version)."""

    steps: int = Field(ge=1, description="Optimizer steps.")
    batch_size: int = Field(ge=1, description="Sequences per step.")
    seq_len: int = Field(ge=8, description="Tokens per sequence.")
    learning_rate: float = Field(gt=0, description="Peak learning rate.")
    eval_fraction: float = Field(
        default=0.1, gt=0, lt=0.5, description="Share of the corpus held out for evaluation."
    )
    seed: int = Field(default=0, description="Random seed.")
    lora_rank: int | None = Field(default=None, ge=1, description="LoRA rank (homelab fine-tunes).")


class TrainingRun(_Strict):
    """A training run on a GPU cluster, producing a new version of a model's weights."""

    model: str = Field(description="A trained model of models.")
    cluster: str = Field(description="The GPU cluster it runs on.")
    node_role: str = Field(default="training", description="The role of the nodes it runs on.")
    nodes: int = Field(default=1, ge=1, description="Nodes it spans.")
    gpus_per_node: int = Field(ge=1, description="GPUs requested on each node.")
    memory: Quantity = Field(default="32Gi", description="Memory requested per node.")
    corpus: list[str] = Field(min_length=1, description="Globs of text files, from the project.")
    schedule: str | None = Field(default=None, description="Cron, as Dagster schedules read it.")
    hyperparameters: TrainingHyperparameters = Field(description="What the homelab runs.")
    twin_hyperparameters: TrainingHyperparameters | None = Field(
        default=None, description="What the twin runs instead (a CPU-sized run)."
    )
    max_eval_loss_regression: float = Field(
        default=0.05, ge=0, description="How much worse (eval loss) a new version may be."
    )

    @field_validator("corpus")
    @classmethod
    def _corpus_stays_in_the_project(cls, value: list[str]) -> list[str]:
        reasons = [r for r in map(check_corpus_glob, value) if r]
        if reasons:
            raise ValueError("; ".join(reasons))
        return value

    @field_validator("schedule")
    @classmethod
    def _cron_has_five_fields(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) != 5:
            raise ValueError(f"cron schedule {value!r} must have five fields")
        return value


class Endpoint(_Strict):
    """An OpenAI-compatible vLLM endpoint serving a model on a cluster."""

    model: str = Field(description="The model it serves.")
    cluster: str = Field(description="The cluster it runs on.")
    namespace: Name = Field(default="ml-inference", description="Its namespace.")
    node_role: str = Field(default="inference", description="The role of the nodes it runs on.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica (one node).")
    accelerator: Literal["gpu", "cpu"] = Field(
        default="gpu",
        description="gpu: each replica holds tensor_parallel_size GPUs; cpu: vLLM's CPU build "
        "(a small model), no GPU (set `image` to a CPU build, e.g. ghcr.io/homelab/vllm-cpu).",
    )
    max_model_len: int = Field(default=4096, ge=16, description="vLLM --max-model-len.")
    replicas: int = Field(default=1, ge=1, description="Replicas.")
    node_port: int | None = Field(default=None, ge=1, le=65535, description="Its NodePort.")
    port_category: str = Field(default="ai-ml", description="The node_port's category.")
    image: str = Field(
        default="vllm/vllm-openai:v0.33.0",
        description="Container image on the homelab, at a pinned tag (the twin runs its own "
        "image of vLLM's CPU build).",
    )
    export_to_mesh: bool = Field(default=True, description="Export the service to the mesh.")
    served_name: Name | None = Field(
        default=None,
        description="The model name clients ask for (default: the endpoint's name); "
        "`<served_name>@<digest>` names the weights version too.",
    )
    chat_template: str | None = Field(
        default=None,
        description="A Jinja chat template (text), for a model without one: mounted from a "
        "ConfigMap, outside the weights, so their digest is unchanged.",
    )
    latency_budget_ms: int = Field(
        default=10000, ge=1, description="The most one short completion may take (a check)."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More vLLM server arguments, as given to the server."
    )

    @property
    def gpus(self) -> int:
        """The GPUs one replica holds."""
        return self.tensor_parallel_size if self.accelerator == "gpu" else 0

    def served_model_name(self, endpoint: str) -> str:
        """The name clients ask for: ``served_name``, else the endpoint's name."""
        return self.served_name or endpoint


class Ml(_Strict):
    """How training runs, and where weights live."""

    launcher: Literal["pods", "flyte"] = Field(
        default="pods",
        description="How training runs on the homelab: a pod per run on its cluster through "
        "Dagster Pipes (pods), or a Flyte execution (flyte). The twin runs pods.",
    )
    flyte_project: str = Field(default="homelab", description="Flyte project.")
    flyte_domain: str = Field(default="production", description="Flyte domain.")
    weights_bucket: str = Field(default="ml-models", description="MinIO bucket of the weights.")
    training_namespace: Name = Field(
        default="ml-training", description="Where training pods run (the GPU quota's namespace)."
    )
    hf_token_secret: Name | None = Field(
        default=None,
        description="A Secret in the training namespace whose key `token` is the Hugging Face "
        "token a gated base model needs; only the training pods read it.",
    )


class Orchestrator(_Strict):
    """Where Dagster itself runs on the homelab: its runs and steps are pods there."""

    cluster: Name = Field(default="studio", description="The cluster running Dagster.")
    namespace: Name = Field(default="dagster", description="The namespace of its pods.")
    node_role: str = Field(
        default="platform", description="The role of the nodes its run and step pods run on."
    )


class Inventory(_Strict):
    """The whole homelab."""

    version: Literal[1] = Field(description="Format version of this file.")
    name: str = Field(default="homelab", description="The homelab's name.")
    port_ranges: dict[str, tuple[int, int]] = Field(
        default_factory=dict, description="NodePort categories: name to [low, high]."
    )
    clusters: dict[Name, Cluster] = Field(min_length=1, description="The clusters, by name.")
    components: dict[Name, Component] = Field(
        default_factory=dict, description="Third-party Helm releases, by name."
    )
    mesh: Mesh = Field(default_factory=Mesh, description="The multicluster mesh.")
    ml: Ml = Field(default_factory=Ml, description="Training and weights settings.")
    orchestrator: Orchestrator = Field(
        default_factory=Orchestrator, description="Where Dagster's runs and steps run."
    )
    models: dict[ModelName, Model] = Field(default_factory=dict, description="Models, by name.")
    training_runs: dict[Name, TrainingRun] = Field(
        default_factory=dict, description="Training runs, by name."
    )
    endpoints: dict[Name, Endpoint] = Field(default_factory=dict, description="Endpoints.")

    def counts(self) -> dict[str, int]:
        """How many of each thing the inventory declares (the summary's numbers)."""
        nodes = [n for c in self.clusters.values() for n in c.expanded_nodes()]
        return {
            "clusters": len(self.clusters),
            "nodes": len(nodes),
            "gpus": sum(n.gpus for n in nodes),
            "mesh_links": len(self.mesh.links),
            "models": len(self.models),
            "training_runs": len(self.training_runs),
            "endpoints": len(self.endpoints),
        }
