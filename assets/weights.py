"""``model_weights/<model>``: the versions of a model's weights, in the weights store."""

from __future__ import annotations

import dagster as dg

from assets._keys import model_weights_key, training_run_key
from assets._pending import PENDING_TAGS, not_built_yet
from homelab_dagster.inventory import Model

__all__ = ["build_model_weights_defs"]


def build_model_weights_defs(name: str, model: Model, runs: list[str]) -> dg.Definitions:
    """The asset of model ``name``'s weights, fed by the training runs ``runs``."""
    key = model_weights_key(name)

    @dg.asset(
        key=key,
        deps=[training_run_key(r) for r in runs],
        tags=PENDING_TAGS,
        group_name="ml",
        kinds={"safetensors"},
        description=f"Weights of {name} ({model.source}).",
    )
    def _weights() -> None:
        not_built_yet(key, "registering model weights")

    return dg.Definitions(assets=[_weights])
