"""``vllm_endpoint/<endpoint>``: an OpenAI-compatible server for a model's weights."""

from __future__ import annotations

import dagster as dg

from assets._keys import cluster_key, endpoint_key, model_weights_key
from assets._stack import PENDING_TAGS, not_built_yet
from homelab_dagster.inventory import Endpoint

__all__ = ["build_endpoint_defs"]


def build_endpoint_defs(name: str, endpoint: Endpoint) -> dg.Definitions:
    """The asset of endpoint ``name``: on its cluster, serving its model's weights."""
    key = endpoint_key(name)

    @dg.asset(
        key=key,
        deps=[cluster_key(endpoint.cluster), model_weights_key(endpoint.model)],
        tags=PENDING_TAGS,
        group_name="ml",
        kinds={"vllm", "kubernetes"},
        description=f"{endpoint.model} on {endpoint.cluster}, tensor-parallel "
        f"{endpoint.tensor_parallel_size}.",
    )
    def _endpoint() -> None:
        not_built_yet(key, "deploying and checking a vLLM endpoint")

    return dg.Definitions(assets=[_endpoint])
