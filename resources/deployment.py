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
| training | flytekit's local execution | FlyteRemote on Forge |
| weights | ``<state>/weights`` | the MinIO bucket |
| executor | multiprocess, steps forked from a preloaded server | ``k8s_job_executor``: each step a pod on the orchestrator's nodes |
| training schedules | stopped | running |
| the twin's control planes | started by the CLI before a run | none |
| the Git sensor (``git``: ``$HOMELAB_GIT_REPO``, default this checkout) | running | stopped |
"""  # noqa: E501

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from homelab_dagster.inventory import Distribution, Inventory, Ml, Orchestrator
from homelab_dagster.settings import Settings, Target
from resources.flyte import LocalFlyteLauncher, RemoteFlyteLauncher
from resources.git import GitRepository
from resources.kubernetes import KubernetesClusters
from resources.pulumi import PulumiStacks
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


@dataclass(frozen=True)
class Deployment:
    """What the code location runs with in one world."""

    resources: dict[str, dg.ConfigurableResource]
    executor: dg.ExecutorDefinition
    schedules_running: bool
    local_twin: bool  # the CLI starts the twin's control planes before a run
    git_sensor_running: bool  # the Git sensor starts running (the UI can toggle it)


def twin_kubeconfig(state_dir: Path) -> Path:
    """The twin's kubeconfig (as :class:`homelab_dagster.twin.Twin` writes it)."""
    return state_dir / "twin" / "kubeconfig"


def build_deployment(settings: Settings, inventory: Inventory | None) -> Deployment:
    """The deployment of ``settings.target`` for ``inventory`` (None: an invalid inventory)."""
    if settings.target is Target.TWIN:
        return Deployment(
            resources=_twin_resources(settings),
            executor=_local_executor(),
            schedules_running=False,
            local_twin=True,
            git_sensor_running=True,
        )
    return Deployment(
        resources=_homelab_resources(settings, inventory),
        executor=_k8s_executor(inventory.orchestrator if inventory else Orchestrator()),
        schedules_running=True,
        local_twin=False,
        git_sensor_running=False,
    )


def _twin_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    state = settings.state_dir
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
        "kubernetes": KubernetesClusters(
            kubeconfig=str(twin_kubeconfig(state)), context_prefix="twin-"
        ),
        "flyte": LocalFlyteLauncher(
            corpus_root=str(settings.inventory_path.parent), work_dir=str(state / "flyte")
        ),
        "weights_store": WeightsStore(url=str(state / "weights")),
        "git": _git_repository(settings),
    }


def _homelab_resources(
    settings: Settings, inventory: Inventory | None
) -> dict[str, dg.ConfigurableResource]:
    """Homelab environment (read at launch, never at import): ``HOMELAB_TRAINING_IMAGE``,
    ``HOMELAB_WEIGHTS_S3_ENDPOINT``, the AWS credential variables for the bucket, flytekit's
    ``FLYTECTL_CONFIG`` or ``FLYTE_PLATFORM_URL``, Pulumi's backend and passphrase."""
    ml = inventory.ml if inventory else Ml()
    contexts = {
        name: f"kind-{name}" if cluster.distribution is Distribution.KIND else name
        for name, cluster in (inventory.clusters.items() if inventory else [])
    }
    return {
        "pulumi": PulumiStacks(
            target=settings.target.value, state_dir=str(settings.state_dir), use_toolchain=False
        ),
        "kubernetes": KubernetesClusters(
            kubeconfig=os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0],
            contexts=contexts,
        ),
        "flyte": RemoteFlyteLauncher(
            corpus_root=str(settings.inventory_path.parent),
            project=ml.flyte_project,
            domain=ml.flyte_domain,
            image=dg.EnvVar("HOMELAB_TRAINING_IMAGE"),
        ),
        "weights_store": WeightsStore(
            url=f"s3://{ml.weights_bucket}",
            endpoint_url=dg.EnvVar("HOMELAB_WEIGHTS_S3_ENDPOINT"),
        ),
        "git": _git_repository(settings),
    }


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


def _k8s_executor(orchestrator: Orchestrator) -> dg.ExecutorDefinition:
    """Each step a Kubernetes Job in the orchestrator's namespace, on its nodes, with the
    project's image (``HOMELAB_IMAGE``, read at launch); an asset's ``dagster-k8s/config``
    tag adds its resources."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(
        {
            "job_namespace": orchestrator.namespace,
            "load_incluster_config": True,
            "job_image": {"env": "HOMELAB_IMAGE"},
            "max_concurrent": MAX_CONCURRENT_STEPS,
            "step_k8s_config": {
                "pod_spec_config": {"node_selector": {"role": orchestrator.node_role}}
            },
        },
        name="k8s",
    )
