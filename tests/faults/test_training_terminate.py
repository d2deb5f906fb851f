"""Fault: a training run terminated from the UI while its pod trains on Forge's real node."""

from __future__ import annotations

import time

import pytest

from .test_terminate import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.twin, pytest.mark.slow, pytest.mark.timeout(1800)]

RUN = "sre-runbook"
NAMESPACE = "ml-training"


def _training_pods(core) -> list:
    return core.list_namespaced_pod(
        NAMESPACE, label_selector=f"homelab.dev/training-run={RUN}"
    ).items


def test_terminating_a_training_run_from_the_ui_deletes_its_pod_within_seconds(
    real_forge, shipped_inventory, dev_ui
):
    """Injects: the UI's *Terminate* (GraphQL ``terminateRun``) of a run of
    ``training_run/sre-runbook`` launched from the UI, once its pod's training container runs.
    Asserts: the pod is gone within 15 s of the terminate (10 s measured when idle), the run ends
    CANCELED, and nothing of it is listed in the weights store."""
    from kubernetes import client

    from homelab_dagster.settings import Settings, Target
    from infra.images import ImageBuilder, missing_tools
    from resources.deployment import build_deployment

    why = missing_tools()
    if why:
        pytest.skip(f"the twin's images cannot be built here: {why}")
    real_forge.registry.up()
    ImageBuilder().build_and_push(["homelab-training"], real_forge.registry)
    settings = Settings(
        real_forge.root.parent / "homelab.yaml",
        Target.TWIN,
        real_forge.root.parent,
        twin_port_base=real_forge.api_port_base,
    )
    store = build_deployment(settings, shipped_inventory).resources["weights_store"]
    listed = store.versions("sre-agent")
    core = client.CoreV1Api(real_forge.client("forge"))
    # Only the run's namespace, not cluster/forge: the session's cluster tests provision Forge
    # from nothing in this state directory's stacks (tests/test_clusters_twin.py).
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    try:
        _terminate_while_training(dev_ui, core)
    finally:
        core.delete_namespace(NAMESPACE)
        wait_until(
            lambda: NAMESPACE not in {n.metadata.name for n in core.list_namespace().items},
            f"namespace {NAMESPACE} was not deleted",
            timeout=180,
        )
    assert store.versions("sre-agent") == listed


def _terminate_while_training(dev_ui, core) -> None:
    launched = dev_ui.launch(["training_run", RUN])
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    def training() -> bool:
        return any(
            any(s.state.running for s in p.status.container_statuses or [])
            for p in _training_pods(core)
        )

    wait_until(training, "the run's training container did not start", timeout=600)
    assert dev_ui.terminate(run_id)["__typename"] == "TerminateRunSuccess"
    terminated = time.monotonic()
    wait_until(lambda: not _training_pods(core), "the training pod outlived its run", timeout=60)
    gone_after = time.monotonic() - terminated
    assert gone_after < 15, f"the pod went {gone_after:.1f} s after the terminate"
    dev_ui.wait_for_status(run_id, {"CANCELED"})
