"""Helpers the twin tests share: waiting for a condition, and the scheduler's refusal of a pod."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait(predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.25) -> T:
    """``predicate()`` once it is truthy, or its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def assert_refused_for_gpus(core: Any, pod: str, namespace: str = "default") -> None:
    """``pod`` stays Pending with the scheduler's ``Insufficient nvidia.com/gpu`` event."""

    def refusals() -> list[Any]:
        events = core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={pod}"
        ).items
        return [e for e in events if e.reason == "FailedScheduling"]

    events = wait(refusals)
    assert events, f"no FailedScheduling event for {pod}"
    assert "Insufficient nvidia.com/gpu" in events[0].message
    assert core.read_namespaced_pod(pod, namespace).status.phase == "Pending"


def provisioned_forge(twin: Any, inventory: Any, images: list[str], inventory_file: Any) -> dict:
    """The twin's deployment resources (``build_deployment`` for ``inventory_file``, whose
    directory is the project: a corpus, say) after ``images`` are in the twin's registry and
    ``cluster/forge`` is materialised (its namespaces, quotas and node labels). Skips where the
    images cannot be built."""
    import dagster as dg
    import pytest

    from assets.clusters import build_cluster_defs
    from homelab_dagster.settings import Settings, Target
    from infra.images import ImageBuilder, missing_tools
    from resources.deployment import build_deployment

    why = missing_tools()
    if why:
        pytest.skip(f"the twin's images cannot be built here: {why}")
    twin.registry.up()
    ImageBuilder().build_and_push(images, twin.registry)
    settings = Settings(
        inventory_file, Target.TWIN, twin.root.parent, twin_port_base=twin.api_port_base
    )
    resources = build_deployment(settings, inventory).resources
    forge = inventory.clusters["forge"]
    # A live instance in context (tests/conftest.py, _live_dagster_instance_in_context: a
    # module fixture is set up outside that function-scoped one).
    with dg.DagsterInstance.ephemeral() as instance:
        cluster = dg.materialize(
            list(build_cluster_defs("forge", forge, inventory.components).assets or []),
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )
    assert cluster.success, [e.message for e in cluster.all_events if e.is_failure]
    return resources
