"""The infrastructure resources of a target: Pulumi stacks and Kubernetes access.

The one place where the target picks their configuration (the behaviour is the same on both,
only where things are differs):

| | twin | homelab |
|---|---|---|
| Pulumi backend | ``file://<state>/pulumi/backend`` | ``$PULUMI_BACKEND_URL``, else the same file backend |
| passphrase | ``<state>/pulumi/passphrase``, generated once (0600) | ``$PULUMI_CONFIG_PASSPHRASE_FILE`` or ``$PULUMI_CONFIG_PASSPHRASE`` |
| Pulumi CLI and provider | the twin's toolchain | ``pulumi`` on ``PATH`` (plugins as Pulumi finds them) |
| kubeconfig | ``<state>/twin/kubeconfig``, contexts ``twin-<cluster>`` | ``$KUBECONFIG`` or ``~/.kube/config``; ``kind-<cluster>`` for Kind clusters, ``<cluster>`` for k3s |
"""  # noqa: E501

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from homelab_dagster.inventory import Distribution, Inventory
from homelab_dagster.settings import Settings, Target
from resources.kubernetes import KubernetesClusters
from resources.pulumi import PulumiStacks

__all__ = ["build_stack_resources", "twin_kubeconfig"]


def twin_kubeconfig(state_dir: Path) -> Path:
    """The twin's kubeconfig (as :class:`homelab_dagster.twin.Twin` writes it)."""
    return state_dir / "twin" / "kubeconfig"


def build_stack_resources(
    settings: Settings, inventory: Inventory | None
) -> dict[str, dg.ConfigurableResource]:
    """``{"pulumi": PulumiStacks, "kubernetes": KubernetesClusters}`` for ``settings.target``."""
    state = settings.state_dir
    if settings.target is Target.TWIN:
        return {
            "pulumi": PulumiStacks(
                target=settings.target.value,
                state_dir=str(state),
                backend_url=f"file://{state / 'pulumi' / 'backend'}",
                passphrase_file=str(state / "pulumi" / "passphrase"),
                generate_passphrase=True,
            ),
            "kubernetes": KubernetesClusters(
                kubeconfig=str(twin_kubeconfig(state)), context_prefix="twin-"
            ),
        }
    contexts = {
        name: f"kind-{name}" if cluster.distribution is Distribution.KIND else name
        for name, cluster in (inventory.clusters.items() if inventory else [])
    }
    return {
        "pulumi": PulumiStacks(
            target=settings.target.value, state_dir=str(state), use_toolchain=False
        ),
        "kubernetes": KubernetesClusters(
            kubeconfig=os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0],
            contexts=contexts,
        ),
    }
