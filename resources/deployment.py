"""The configuration root: the one place where the target (twin or homelab) is read.

Everything that differs between the two worlds is decided here, from ``settings.target``,
and handed on as plain configuration: the resources (the same classes, configured per
world, or the one implementation that fits where behaviour truly differs), the executor
that runs every job, and the capabilities that the programs, sensors and CLI act on. No
other module asks which target it runs on.

| | twin | homelab |
|---|---|---|
| Pulumi backend | ``file://<state>/pulumi/backend`` | ``$PULUMI_BACKEND_URL``, else the same file backend |
| passphrase | ``<state>/pulumi/passphrase``, generated once (0600) | ``$PULUMI_CONFIG_PASSPHRASE_FILE`` or ``$PULUMI_CONFIG_PASSPHRASE`` |
| Pulumi CLI and provider | the twin's toolchain | ``pulumi`` on ``PATH`` (plugins as Pulumi finds them) |
| Helm components, Linkerd ``Link`` | skipped (no chart repository is reachable) | installed |
| kubeconfig | ``<state>/twin/kubeconfig``, contexts ``twin-<cluster>`` | ``$KUBECONFIG`` or ``~/.kube/config``; ``kind-<cluster>`` for Kind clusters, ``<cluster>`` for k3s |
| training | a pod per run on the run's real node (Pipes); flytekit's local execution where real nodes cannot run (not root) | a pod per run on the run's nodes (Pipes), or FlyteRemote on Forge (``ml.launcher: flyte``) |
| weights store (``ml.weights_bucket``) | versitygw on loopback (``homelab twin up``), keys in ``<state>/twin/store/credentials`` | MinIO at ``$HOMELAB_WEIGHTS_S3_ENDPOINT``, keys from ``AWS_*`` |
| serving pods' copy step: endpoint, keys | the store's address on ``lo``; a Secret of the generated keys | the same endpoint; an ``ExternalSecret`` (ClusterSecretStore ``homelab``) |
| images asked for before a deploy | the twin's registry (``homelab twin up`` fills it) | not asked (the nodes pull from ``ghcr.io``) |
| executor | multiprocess, steps forked from a preloaded server | ``k8s_job_executor``: each step a pod on the orchestrator's nodes |
| training schedules | stopped | running |
| the twin's control planes | started by the CLI before a run | none |
| the Git sensor (``git``: ``$HOMELAB_GIT_REPO``, default this checkout) | running | stopped |
| the ``reconcile`` schedule (``$HOMELAB_RECONCILE_CRON``) and the failure sensor | running | running |
| auto-repair of drifted assets (``$HOMELAB_AUTO_REPAIR``) | every family | none: drift stays visible |
| the automation sensor (links, weights, endpoints follow their upstreams) | running | stopped |
| the failure webhook (``$HOMELAB_WEBHOOK_URL``, read at launch) | where set | where set |

``HOMELAB_AUTOMATION=off`` starts every schedule and sensor stopped, on either target: a
UI to look around in (or a homelab under maintenance) where nothing launches by itself.
"""  # noqa: E501

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from homelab_dagster.errors import SettingsError
from homelab_dagster.images import image_reference
from homelab_dagster.inventory import Distribution, Inventory, Ml, Orchestrator
from homelab_dagster.settings import (
    DAGSTER_POSTGRES_URL_VAR,
    REPAIR_FAMILIES,
    WEBHOOK_URL_VAR,
    Settings,
    Target,
)
from homelab_dagster.twin import STORE_PORT_INDEX, cluster_kubeconfig, service_port
from homelab_dagster.twin_host import loopback_address
from homelab_dagster.twin_nodes import REAL_NODE_LABELS
from infra.toolchain import cache_root
from resources.flyte import LocalFlyteLauncher, RemoteFlyteLauncher
from resources.git import GitRepository
from resources.kubernetes import KubernetesClusters
from resources.orchestrator import DagsterOnKubernetes
from resources.pulumi import PulumiStacks
from resources.registry import ImageRegistry
from resources.training import TrainingLauncher
from resources.training_pods import PodTrainingLauncher
from resources.vllm import VllmServers
from resources.webhook import Webhook
from resources.weights import WeightsStore

__all__ = ["PRELOAD_MODULES", "Deployment", "build_deployment", "twin_kubeconfig"]

# What the local executor's fork server imports once, so that each step (a fork of it) does
# not import Dagster, the SDKs and the code location again: seconds of CPU apiece.
PRELOAD_MODULES = [
    "dagster",
    "kubernetes.client",
    "pulumi.automation",
    "pulumi_kubernetes.core.v1",
    "homelab_dagster.definitions",
]
# The most stack steps at once: each runs a Pulumi engine and a provider.
MAX_CONCURRENT_STEPS = 8
_CHARTS_NOTE = "the twin cannot reach chart repositories; installed on the homelab target"
# The weights store's S3 endpoint on the homelab (MinIO on Forge), for steps and pods alike.
WEIGHTS_ENDPOINT_VAR = "HOMELAB_WEIGHTS_S3_ENDPOINT"


@dataclass(frozen=True)
class Deployment:
    """What the code location runs with in one world."""

    resources: dict[str, dg.ConfigurableResource]
    executor: dg.ExecutorDefinition
    schedules_running: bool
    local_twin: bool  # the CLI starts the twin's control planes before a run
    git_sensor_running: bool  # the Git sensor starts running (the UI can toggle it)
    reconcile_running: bool = False  # the reconcile schedule and the failure sensor
    automation_running: bool = False  # the automation sensor (declarative automation)
    auto_repair: frozenset[str] = frozenset()  # the families the reconcile repairs
    # The Dagster instance's dagster.yaml when steps run as pods (HOMELAB_RUNS=kubernetes):
    # its run launcher is dagster-k8s's; None: Dagster's defaults (cli/launch.py).
    instance_yaml: str | None = None

    def pulled_images(self, inventory: Inventory, clusters: Iterable[str]) -> list[str]:
        """The images this deployment's pods pull on ``clusters``: each endpoint's server
        and copy step there, the training image where runs train in pods, and Dagster's own
        on the orchestrator's cluster (what
        ``homelab twin up`` makes sure the twin's registry holds)."""
        wanted = set(clusters)
        vllm = self.resources["vllm"]
        assert isinstance(vllm, VllmServers)
        images = [
            image
            for endpoint in inventory.endpoints.values()
            if endpoint.cluster in wanted
            for image in vllm.pulled_images(endpoint)
        ]
        training = self.resources["training"]
        if isinstance(training, PodTrainingLauncher) and any(
            run.cluster in wanted for run in inventory.training_runs.values()
        ):
            images.append(training.image)
        if inventory.orchestrator.cluster in wanted:
            dagster = self.resources["dagster_on_kubernetes"]
            assert isinstance(dagster, DagsterOnKubernetes)
            images.append(dagster.image)
        return list(dict.fromkeys(images))

    @property
    def steps_as_pods(self) -> bool:
        """Each step runs as a pod (``k8s_job_executor``): their pods are watched."""
        return self.instance_yaml is not None


def twin_kubeconfig(state_dir: Path) -> Path:
    """The twin's kubeconfig (as :class:`homelab_dagster.twin.Twin` writes it)."""
    return state_dir / "twin" / "kubeconfig"


def build_deployment(settings: Settings, inventory: Inventory | None) -> Deployment:
    """The deployment of ``settings.target`` for ``inventory`` (None: an invalid inventory)."""
    dagster = _dagster_on_kubernetes(settings, inventory)
    default_runs = "local" if settings.target is Target.TWIN else "kubernetes"
    on_kubernetes = (settings.runs or default_runs) == "kubernetes"
    if on_kubernetes and settings.target is Target.TWIN and settings.dagster_postgres:
        raise SettingsError(
            "HOMELAB_RUNS=kubernetes on the twin keeps Dagster's storage in SQLite files that "
            f"its pods share; unset {DAGSTER_POSTGRES_URL_VAR} or HOMELAB_RUNS"
        )
    executor = _k8s_executor(dagster) if on_kubernetes else _local_executor()
    instance_yaml = dagster.instance_yaml() if on_kubernetes else None
    on = settings.automation  # HOMELAB_AUTOMATION=off: nothing starts running
    if settings.target is Target.TWIN:
        # The twin's registry (homelab_dagster/twin.py: the first port after the clusters').
        registry = (
            f"127.0.0.1:{service_port(inventory, settings.twin_port_base, 0)}" if inventory else ""
        )
        return Deployment(
            resources={
                **_twin_resources(settings, inventory, dagster.image),
                "dagster_on_kubernetes": dagster,
                "image_registry": ImageRegistry(address=registry),
            },
            executor=executor,
            instance_yaml=instance_yaml,
            schedules_running=False,
            local_twin=True,
            git_sensor_running=on,
            reconcile_running=on,
            automation_running=on,
            auto_repair=_auto_repair(settings, frozenset(REPAIR_FAMILIES)),
        )
    return Deployment(
        resources={
            **_homelab_resources(settings, inventory, dagster.image),
            "dagster_on_kubernetes": dagster,
            "image_registry": ImageRegistry(),
        },
        executor=executor,
        instance_yaml=instance_yaml,
        schedules_running=on,
        local_twin=False,
        git_sensor_running=False,
        reconcile_running=on,
        automation_running=False,
        auto_repair=_auto_repair(settings, frozenset()),
    )


def _auto_repair(settings: Settings, default: frozenset[str]) -> frozenset[str]:
    """``settings.auto_repair`` where set, else the target's ``default``."""
    return default if settings.auto_repair is None else settings.auto_repair


def _webhook(settings: Settings) -> Webhook:
    """The failure webhook: its URL read at launch (never at import), where one is set."""
    return Webhook(url=dg.EnvVar(WEBHOOK_URL_VAR)) if settings.webhook else Webhook()


def _twin_resources(
    settings: Settings, inventory: Inventory | None, image: str
) -> dict[str, dg.ConfigurableResource]:
    state = settings.state_dir
    ml = inventory.ml if inventory else Ml()
    # The twin's object store (homelab_dagster/twin_store.py): this machine's processes reach
    # it on loopback, the serving pods at its address on `lo` (through their node's bridge).
    port = service_port(inventory, settings.twin_port_base, STORE_PORT_INDEX) if inventory else 0
    keys = str(state / "twin" / "store" / "credentials")
    kubernetes = KubernetesClusters(kubeconfig=str(twin_kubeconfig(state)), context_prefix="twin-")
    weights_store = WeightsStore(
        bucket=ml.weights_bucket, endpoint_url=f"http://127.0.0.1:{port}", credentials_file=keys
    )
    corpus_root = str(settings.inventory_path.parent)
    training: TrainingLauncher
    if _real_nodes_run_here():
        # A pod on the run's real node (`twin: real`): the homelab's path, scaled down.
        training = PodTrainingLauncher(
            corpus_root=corpus_root,
            scaled_down=True,
            image=image_reference("homelab-training"),
            kubernetes=kubernetes,
            weights_store=weights_store,
            store_endpoint_url=f"http://{loopback_address(port)}:{port}",
            namespace=ml.training_namespace,
            memory=TWIN_TRAINING_MEMORY,
            node_selector=REAL_NODE_LABELS,
        )
    else:
        training = LocalFlyteLauncher(corpus_root=corpus_root, work_dir=str(state / "flyte"))
    return {
        "pulumi": PulumiStacks(
            target=settings.target.value,
            state_dir=str(state),
            backend_url=f"file://{state / 'pulumi' / 'backend'}",
            passphrase_file=str(state / "pulumi" / "passphrase"),
            generate_passphrase=True,
            install_charts=False,
            charts_note=_CHARTS_NOTE,
            linkerd_link=False,
        ),
        "kubernetes": kubernetes,
        "training": training,
        "weights_store": weights_store,
        # vLLM's CPU build (docs/serving.md).
        "vllm": VllmServers(
            image=image_reference("vllm-cpu"),
            runtime_args=["--enforce-eager", "--dtype", "float32"],
            runtime_env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
            memory="4Gi",
            weights_bucket_url=f"s3://{ml.weights_bucket}",
            weights_endpoint_url=f"http://{loopback_address(port)}:{port}",
            weights_copy_image=image,
            weights_credentials_file=keys,
            serves_unstored=False,
        ),
        "git": _git_repository(settings),
        "webhook": _webhook(settings),
    }


def _homelab_resources(
    settings: Settings, inventory: Inventory | None, image: str
) -> dict[str, dg.ConfigurableResource]:
    """Homelab environment (read at launch, never at import):
    ``HOMELAB_WEIGHTS_S3_ENDPOINT``, the AWS credential variables for the bucket, flytekit's
    ``FLYTECTL_CONFIG`` or ``FLYTE_PLATFORM_URL``, Pulumi's backend and passphrase."""
    ml = inventory.ml if inventory else Ml()
    contexts = {
        name: f"kind-{name}" if cluster.distribution is Distribution.KIND else name
        for name, cluster in (inventory.clusters.items() if inventory else [])
    }
    kubernetes = KubernetesClusters(
        kubeconfig=os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0],
        contexts=contexts,
    )
    # Keys: boto3's chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: docs/deploy.md).
    weights_store = WeightsStore(
        bucket=ml.weights_bucket, endpoint_url=dg.EnvVar(WEIGHTS_ENDPOINT_VAR)
    )
    corpus_root = str(settings.inventory_path.parent)
    training: TrainingLauncher
    if ml.launcher == "flyte":
        training = RemoteFlyteLauncher(
            corpus_root=corpus_root,
            project=ml.flyte_project,
            domain=ml.flyte_domain,
            image=image_reference("homelab-training"),
        )
    else:
        training = PodTrainingLauncher(
            corpus_root=corpus_root,
            image=image_reference("homelab-training"),
            kubernetes=kubernetes,
            weights_store=weights_store,
            store_endpoint_url=dg.EnvVar(WEIGHTS_ENDPOINT_VAR),
            namespace=ml.training_namespace,
            hf_token_secret=ml.hf_token_secret,
            compile_model=True,
        )
    return {
        "pulumi": PulumiStacks(
            target=settings.target.value, state_dir=str(settings.state_dir), use_toolchain=False
        ),
        "kubernetes": kubernetes,
        "training": training,
        "weights_store": weights_store,
        # The copy step's keys: an ExternalSecret from the ClusterSecretStore `homelab`.
        "vllm": VllmServers(
            weights_bucket_url=f"s3://{ml.weights_bucket}",
            weights_endpoint_url=dg.EnvVar(WEIGHTS_ENDPOINT_VAR),
            weights_copy_image=image,
        ),
        "git": _git_repository(settings),
        "webhook": _webhook(settings),
    }


# A training pod's memory on the twin: its real node has this machine's memory, not the
# inventory's (two ranks of the twin's model hold about 1.5 GiB).
TWIN_TRAINING_MEMORY = "4Gi"


def _real_nodes_run_here() -> bool:
    """Whether this machine can run the twin's real nodes' pods: root on Linux (what
    ``homelab_dagster.twin_real.unavailable`` asks first; without it every node is a KWOK
    node and training runs in a local process, saying so)."""
    return sys.platform.startswith("linux") and os.geteuid() == 0


def _git_repository(settings: Settings) -> GitRepository:
    """The watched repository: ``settings.git_repo`` (default: the checkout holding the
    inventory), its branch, a mirror under ``<state>/git``."""
    checkout = settings.inventory_path.parent
    return GitRepository(
        url=settings.git_repo or str(checkout),
        branch=settings.git_branch,
        state_dir=str(settings.state_dir / "git"),
        inventory_file=settings.inventory_path.name if not settings.git_repo else "homelab.yaml",
    )


def _local_executor() -> dg.ExecutorDefinition:
    """One process per step (one Pulumi program per process), each forked from a server that
    has imported :data:`PRELOAD_MODULES` once: Dagster's own ``forkserver`` start method."""
    return dg.multiprocess_executor.configured(
        {
            "max_concurrent": MAX_CONCURRENT_STEPS,
            "start_method": {"forkserver": {"preload_modules": PRELOAD_MODULES}},
        }
    )


def _k8s_executor(dagster: DagsterOnKubernetes) -> dg.ExecutorDefinition:
    """Each step a Kubernetes Job in the orchestrator's namespace, on its nodes, with the
    project's image (:class:`~resources.orchestrator.DagsterOnKubernetes`); an asset's
    ``dagster-k8s/config`` tag adds its resources."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(dagster.executor_config(MAX_CONCURRENT_STEPS), name="k8s")


def _dagster_on_kubernetes(settings: Settings, inventory: Inventory | None) -> DagsterOnKubernetes:
    """Where Dagster's run and step pods run, and the orchestrator stack's settings.

    The homelab: the orchestrator's nodes by role, in-cluster API access, the official chart,
    PostgreSQL, secrets from the ``homelab-dagster`` Secret (docs/deploy.md). The twin: the
    orchestrator cluster's real node; the twin's state, the inventory file and the toolchain
    mounted at their own paths; the host's network (the API servers listen on loopback); the
    cluster's kubeconfig file; SQLite files in the state directory, shared with the host.
    """
    orchestrator = inventory.orchestrator if inventory else Orchestrator()
    image = settings.image or image_reference("homelab-dagster")
    if settings.target is Target.HOMELAB:
        return DagsterOnKubernetes(
            cluster=orchestrator.cluster,
            namespace=orchestrator.namespace,
            image=image,
            chart_version=dg.__version__,
            node_selector={"role": orchestrator.node_role},
            deploy="chart",
            env={"HOMELAB_TARGET": Target.HOMELAB.value, "HOMELAB_RUNS": "kubernetes"},
            env_secret="homelab-dagster",
            storage_yaml=_POSTGRES_STORAGE,
        )
    state = settings.state_dir
    home = state / "dagster"
    return DagsterOnKubernetes(
        cluster=orchestrator.cluster,
        namespace=orchestrator.namespace,
        image=image,
        chart_version=dg.__version__,
        node_selector={"role": orchestrator.node_role, **REAL_NODE_LABELS},
        deploy="manifests",
        image_pull_policy="Always",
        webserver_port=service_port(inventory, settings.twin_port_base, 1) if inventory else 3000,
        kubeconfig_file=str(cluster_kubeconfig(state, orchestrator.cluster)),
        host_network=True,
        host_paths={
            str(state): True,
            str(settings.inventory_path): False,
            # Written to: Pulumi's Python plugin for the image's interpreter is made there.
            str(cache_root()): True,
        },
        env={
            "HOMELAB_TARGET": Target.TWIN.value,
            "HOMELAB_STATE_DIR": str(state),
            "HOMELAB_INVENTORY": str(settings.inventory_path),
            "HOMELAB_TWIN_PORT_BASE": str(settings.twin_port_base),
            "HOMELAB_RUNS": "kubernetes",
            "XDG_CACHE_HOME": str(cache_root().parent.parent),
        },
        storage_yaml=f"storage:\n  sqlite:\n    base_dir: {home}\n",
        storage_root=str(home),
    )


_POSTGRES_STORAGE = (
    "storage:\n  postgres:\n    postgres_url:\n      env: HOMELAB_DAGSTER_POSTGRES_URL\n"
)
