"""Fault: a cluster's kube-apiserver killed (SIGKILL) in the middle of ``pulumi up``, right
after the first Kubernetes resource of the stack is reported created."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client

from assets.clusters import cluster_stack
from homelab_dagster.errors import StackError
from homelab_dagster.settings import Settings, Target
from resources.deployment import build_deployment

pytestmark = [pytest.mark.faults, pytest.mark.twin, pytest.mark.slow]

CLUSTER = "pi"


def apiserver_pid(twin, cluster: str) -> int:
    """The pid listening on the cluster's API port (as tests/test_twin.py finds it)."""
    import psutil

    port = twin.api_port(cluster)
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN":
            return conn.pid
    raise AssertionError(f"nothing listens on {port}")


def state_file(stacks, name: str) -> Path:
    return stacks.root / "backend" / ".pulumi" / "stacks" / "homelab" / f"{name}.json"


def cluster_program(
    twin,
    inventory,
    stacks,
    gate: threading.Event | None = None,
    slow: threading.Event | None = None,
) -> tuple[str, Callable[[], None]]:
    """CLUSTER running on the twin, and its stack's name and program (as the asset builds
    them, reaching the twin's API server).

    ``gate``: the program also declares one more resource, a ConfigMap whose data waits for
    the gate (an awaited output: the rest of the update goes on meanwhile). So at least one
    create is still to come when the fault lands, whatever the event stream's delay: without
    it, every create of a small stack can finish before the first "created" event arrives.

    ``slow``: the program also declares a Service whose create Pulumi awaits for as long as
    ``slow`` is set (its selector matches no pod, so no endpoint ever becomes ready): a create
    still running, pending in the state, whenever the fault lands. Once ``slow`` is cleared the
    Service carries ``pulumi.com/skipAwait`` and its create ends at once.
    """
    twin.up([CLUSTER])
    settings = Settings(twin.root.parent / "homelab.yaml", Target.TWIN, twin.root.parent)
    kubernetes = build_deployment(settings, inventory).resources["kubernetes"]
    spec = cluster_stack(CLUSTER, inventory.clusters[CLUSTER], inventory.components)
    program = spec.program(stacks, kubernetes)
    if gate is None and slow is None:
        return stacks.stack_name(spec.key.path), program
    access = kubernetes.access(CLUSTER)

    def with_faults() -> None:
        import pulumi
        import pulumi_kubernetes as k8s

        program()
        provider = k8s.Provider(
            "fault",
            kubeconfig=access.kubeconfig,
            context=access.context,
            enable_server_side_apply=True,
        )
        opts = pulumi.ResourceOptions(provider=provider)
        if gate is not None:

            async def after_gate(value: str) -> str:
                await asyncio.get_running_loop().run_in_executor(None, gate.wait, 120)
                return value

            k8s.core.v1.ConfigMap(
                "fault-gate",
                metadata={"name": "fault-gate", "namespace": "default"},
                data={"after": pulumi.Output.from_input("the fault").apply(after_gate)},
                opts=opts,
            )
        if slow is not None:
            k8s.core.v1.Service(
                "fault-slow",
                metadata={
                    "name": "fault-slow",
                    "namespace": "default",
                    "annotations": {} if slow.is_set() else {"pulumi.com/skipAwait": "true"},
                },
                spec={"selector": {"app": "no-such-pod"}, "ports": [{"port": 80}]},
                opts=opts,
            )

    return stacks.stack_name(spec.key.path), with_faults


class KillOnFirstCreate:
    """The log of ``PulumiStacks.up``: kills the processes ``pids()`` returns (SIGKILL) as soon
    as the first Kubernetes resource is reported created (and, where ``until`` is given, once
    it holds: polled for up to a minute), keeps every line, and then opens ``gate`` where
    given (the program's last resource waits for it)."""

    def __init__(
        self,
        pids: Callable[[], list[int]],
        gate: threading.Event | None = None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        self.pids = pids
        self.gate = gate
        self.until = until
        self.lines: list[str] = []
        self.killed_after: str | None = None

    def info(self, msg: str) -> None:
        self.lines.append(msg)
        if self.killed_after is None and ": created kubernetes:" in msg:
            deadline = time.monotonic() + 60
            while self.until is not None and not self.until():
                assert time.monotonic() < deadline, "the condition to kill on never held"
                time.sleep(0.2)
            pids = self.pids()
            assert pids, "nothing to kill"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            self.killed_after = msg
            if self.gate is not None:
                self.gate.set()

    debug = warning = error = lambda self, msg: self.lines.append(msg)


def test_an_apiserver_killed_mid_up_fails_clearly_and_the_next_up_converges(
    twin, shipped_inventory, stacks, log
):
    """Injects: SIGKILL to pi's kube-apiserver when `up` reports its first resource created.
    Asserts: `up` fails with a StackError carrying the API server's reason and naming the
    resources whose create failed; the state keeps what was created and holds no pending
    operation (the provider reported each failed create, so Pulumi resolved them: nothing is
    left in an unknown state); after `twin.up` restarts the API server, the next `up`
    (refresh first) creates the rest, the one after it changes nothing, and every namespace
    of the inventory exists."""
    cluster = shipped_inventory.clusters[CLUSTER]
    gate = threading.Event()
    name, program = cluster_program(twin, shipped_inventory, stacks, gate)

    pid = apiserver_pid(twin, CLUSTER)
    killer = KillOnFirstCreate(lambda: [pid], gate)
    with pytest.raises(StackError) as info:
        stacks.up(name, program, killer)
    assert killer.killed_after is not None
    message = str(info.value)
    assert f"pulumi up of stack {name} failed" in message
    assert "was not successfully created by the Kubernetes API server" in message
    assert any(r in message for r in ("connection refused", "connection reset by peer"))
    failed = [
        line.split(": kubernetes:", 1)[-1] for line in killer.lines if "create failed" in line
    ]
    assert failed, killer.lines

    latest = json.loads(state_file(stacks, name).read_text())["checkpoint"]["latest"]
    assert not latest.get("pending_operations")
    recorded = {r["urn"].rsplit("::", 1)[-1] for r in latest["resources"]}
    assert killer.killed_after.rsplit(" ", 1)[-1] in recorded  # what was created is kept

    twin.up([CLUSTER])
    recovered = stacks.up(name, program, log)
    assert recovered.changes.get("create", 0) >= len(failed)
    assert stacks.up(name, program, log).changed == 0
    core = client.CoreV1Api(twin.client(CLUSTER))
    assert set(cluster.namespaces) <= {n.metadata.name for n in core.list_namespace().items}
