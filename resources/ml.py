"""The ML resources of a target: the Flyte launcher and the weights store.

The one place where the target picks an implementation: the twin trains with flytekit's
local execution and keeps weights under the state directory; the homelab trains on Forge
through FlyteRemote and keeps weights in MinIO's bucket. Secrets and endpoints are
``EnvVar``s, read when a run starts, never at import.
"""

from __future__ import annotations

import dagster as dg

from homelab_dagster.inventory import Inventory, Ml
from homelab_dagster.settings import Settings, Target
from resources.flyte import LocalFlyteLauncher, RemoteFlyteLauncher
from resources.weights import WeightsStore

__all__ = ["build_ml_resources"]


def build_ml_resources(
    settings: Settings, inventory: Inventory | None
) -> dict[str, dg.ConfigurableResource]:
    """``{"flyte": ..., "weights_store": ...}`` for ``settings.target``.

    Homelab environment (read at launch): ``HOMELAB_TRAINING_IMAGE`` (the training image),
    ``HOMELAB_WEIGHTS_S3_ENDPOINT`` (MinIO's URL), the standard AWS credential variables
    for the bucket, and flytekit's own ``FLYTECTL_CONFIG`` or ``FLYTE_PLATFORM_URL``.
    """
    ml = inventory.ml if inventory else Ml()
    corpus_root = str(settings.inventory_path.parent)
    if settings.target is Target.TWIN:
        return {
            "flyte": LocalFlyteLauncher(
                corpus_root=corpus_root, work_dir=str(settings.state_dir / "flyte")
            ),
            "weights_store": WeightsStore(url=str(settings.state_dir / "weights")),
        }
    return {
        "flyte": RemoteFlyteLauncher(
            corpus_root=corpus_root,
            project=ml.flyte_project,
            domain=ml.flyte_domain,
            image=dg.EnvVar("HOMELAB_TRAINING_IMAGE"),
        ),
        "weights_store": WeightsStore(
            url=f"s3://{ml.weights_bucket}",
            endpoint_url=dg.EnvVar("HOMELAB_WEIGHTS_S3_ENDPOINT"),
        ),
    }
