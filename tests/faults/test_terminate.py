"""Fault: a step stopped while its stack update runs, as Dagster stops one (the UI's
*Terminate*: an interrupt raised in the step's process), with the Pulumi CLI mid-update."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
from kubernetes import client

from .test_apiserver_killed import CLUSTER, apiserver_pid, cluster_program, state_file

pytestmark = [pytest.mark.faults, pytest.mark.twin, pytest.mark.slow]


class InterruptOnFirstCreate:
    """The log of ``PulumiStacks.up``: as soon as the first Kubernetes resource is reported
    created, sends SIGINT to this process (what Dagster's termination does to a step:
    ``os.kill(os.getpid(), SIGINT)`` from a thread); opens ``gate`` (the program's last
    resource waits for it) once the cancellation is announced. Keeps every line."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.lines: list[str] = []
        self.interrupted_after: str | None = None

    def info(self, msg: str) -> None:
        self.lines.append(msg)
        if self.interrupted_after is None and ": created kubernetes:" in msg:
            self.interrupted_after = msg
            os.kill(os.getpid(), signal.SIGINT)

    def warning(self, msg: str) -> None:
        self.lines.append(msg)
        if "cancelling the Pulumi update" in msg:
            self.gate.set()

    debug = error = lambda self, msg: self.lines.append(msg)


def test_an_interrupted_up_cancels_pulumi_releases_the_lock_and_the_next_up_converges(
    twin, shipped_inventory, stacks, log
):
    """Injects: SIGINT to the process running `up` (as Dagster's terminate delivers it to a
    step) when the first resource is reported created, one resource still waiting on a gate.
    Asserts: the interrupt still ends the operation (KeyboardInterrupt, the handler that was
    in place), but only after the Pulumi CLI was cancelled (SIGINT) and ended on its own: the
    CLI's process is gone, no lock is left, the state is readable with no pending operation
    and keeps what was created, the gated resource was never created; the next `up` creates
    the rest and the one after it changes nothing."""
    cluster = shipped_inventory.clusters[CLUSTER]
    gate = threading.Event()
    name, program = cluster_program(twin, shipped_inventory, stacks, gate)
    interrupter = InterruptOnFirstCreate(gate)
    with pytest.raises(KeyboardInterrupt):
        stacks.up(name, program, interrupter)
    assert interrupter.interrupted_after is not None
    assert any(
        "the Pulumi update was cancelled; its state is saved" in x for x in interrupter.lines
    )
    assert stacks.locks(name) == []
    assert not any("removed the lock" in x for x in interrupter.lines), "Pulumi kept its lock"

    latest = json.loads(state_file(stacks, name).read_text())["checkpoint"]["latest"]
    assert not latest.get("pending_operations")
    recorded = {r["urn"].rsplit("::", 1)[-1] for r in latest["resources"]}
    assert interrupter.interrupted_after.rsplit(" ", 1)[-1] in recorded
    gated = [r["urn"] for r in latest["resources"] if r["type"] == "kubernetes:core/v1:ConfigMap"]
    assert gated == []  # the update stopped before it: cancelled, not run to its end

    recovered = stacks.up(name, program, log)
    assert recovered.changes.get("create", 0) >= 1
    assert stacks.up(name, program, log).changed == 0
    core = client.CoreV1Api(twin.client(CLUSTER))
    assert set(cluster.namespaces) <= {n.metadata.name for n in core.list_namespace().items}


def wait_until(condition: Callable[[], object], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout}s")
        time.sleep(0.5)


def test_a_run_terminated_from_the_ui_cancels_pulumi_and_the_next_run_converges(
    twin, shipped_inventory, dev_ui, log
):
    """Injects: the UI's *Terminate* (GraphQL ``terminateRun``, the run launched by the UI's
    ``launchRun`` through the instance's real run coordinator, launcher, run worker and step
    process) while the step's `pulumi up` of pi is in flight: pi's kube-apiserver is frozen
    (SIGSTOP) before the run starts, so the update is certainly mid-way when the terminate
    lands, and thawed (SIGCONT) once the step has announced the cancellation.
    Asserts: the run ends CANCELED, its event log says the Pulumi update was cancelled and its
    state saved; no `pulumi` process is left, the stack holds no lock and no pending
    operation; the next run launched from the UI succeeds and every namespace exists."""
    from assets._keys import cluster_key
    from homelab_dagster.settings import Settings, Target
    from resources.deployment import build_deployment

    twin.up([CLUSTER])
    settings = Settings(twin.root.parent / "homelab.yaml", Target.TWIN, twin.root.parent)
    stacks = build_deployment(settings, shipped_inventory).resources["pulumi"]
    name = stacks.stack_name(cluster_key(CLUSTER).path)
    stacks.destroy(name, log, remove=True)  # a fresh stack: the run creates everything
    path = state_file(stacks, name)

    pid = apiserver_pid(twin, CLUSTER)
    os.kill(pid, signal.SIGSTOP)
    try:
        launched = dev_ui.launch(["cluster", CLUSTER])
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        wait_until(lambda: stacks.locks(name), "the run's `pulumi up` took no lock on the stack")
        assert dev_ui.terminate(run_id)["__typename"] == "TerminateRunSuccess"
        wait_until(
            lambda: any("cancelling the Pulumi update" in m for m in dev_ui.messages(run_id)),
            "the step did not announce the cancellation",
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    dev_ui.wait_for_status(run_id, {"CANCELED"})
    messages = dev_ui.messages(run_id)
    assert any("the Pulumi update was cancelled; its state is saved" in m for m in messages)
    assert not any("removed the lock" in m for m in messages), "Pulumi kept its lock"
    assert stacks.locks(name) == []
    import psutil

    # The cancelled `pulumi up` is gone. (A `pulumi preview --refresh` of the stack may run:
    # the drift watch of `homelab dev` sees the objects this test destroyed, and asks a
    # reconcile run to look at the stack.)
    left = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "pulumi"]
    ups = [p.info["cmdline"] or [] for p in left]
    assert not [c for c in ups if "up" in c and name in " ".join(c)], ups
    if path.exists():  # cancelled before its first checkpoint: no state at all is fine too
        latest = json.loads(path.read_text())["checkpoint"]["latest"]
        assert not latest.get("pending_operations")

    again = dev_ui.launch(["cluster", CLUSTER])
    assert again["__typename"] == "LaunchRunSuccess", again
    dev_ui.wait_for_status(again["run"]["runId"], {"SUCCESS"})
    core = client.CoreV1Api(twin.client(CLUSTER))
    cluster = shipped_inventory.clusters[CLUSTER]
    assert set(cluster.namespaces) <= {n.metadata.name for n in core.list_namespace().items}
