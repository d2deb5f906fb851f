"""``image_registry``: where the nodes pull the images that the steps' pods run.

On the twin it is the twin's registry on loopback (:mod:`homelab_dagster.twin_registry`),
which the real nodes' containerd resolve the homelab's registries through, and nothing else:
a step asks it for its image (one ``HEAD``) before it changes anything, so an image missing
there fails the step at once, naming the image and the command that provides it
(``homelab twin images vllm-cpu``), instead of a pod that cannot pull. On the homelab the
images are in ``ghcr.io``, pushed by the release (docs/deploy.md); it is not asked there (its
credentials are the nodes', not Dagster's), and a pod that cannot pull fails its rollout with
the kubelet's reason.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from homelab_dagster.twin_registry import RegistryClient

__all__ = ["ImageRegistry"]


class ImageRegistry(dg.ConfigurableResource):
    """The registry the nodes pull from, where a step can ask it (the twin's)."""

    address: str = Field(
        default="",
        description="host:port of the twin's registry; empty: images are not asked for "
        "before a deploy (the homelab).",
    )

    def require(self, reference: str) -> str | None:
        """The digest of ``reference`` in the registry (None where it is not asked).

        Raises:
            ImageMissingError: the registry lacks it; the message names the command.
            TwinRegistryError: the registry does not answer.
        """
        return RegistryClient(self.address).require(reference) if self.address else None
