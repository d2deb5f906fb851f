"""Fault: the Pulumi CLI itself killed (SIGKILL) in the middle of ``up``, right after the
first Kubernetes resource is reported created, while another create is still running: what a
hard-killed run leaves behind."""

from __future__ import annotations

import json
import threading

import psutil
import pytest
from kubernetes import client

from homelab_dagster.errors import StackError, StackLockedError, StackStateError

from .test_apiserver_killed import CLUSTER, KillOnFirstCreate, cluster_program, state_file

pytestmark = [pytest.mark.faults, pytest.mark.twin, pytest.mark.slow]


def pulumi_cli() -> list[int]:
    """The pids of the ``pulumi`` processes this process started."""
    return [p.pid for p in psutil.Process().children(recursive=True) if p.name() == "pulumi"]


def pending_creates(stacks, name: str) -> set[str]:
    """The names of the resources the stack's state holds a pending operation for (none while
    the file is unreadable: Pulumi may be writing it)."""
    try:
        latest = json.loads(state_file(stacks, name).read_text())["checkpoint"]["latest"]
    except (OSError, ValueError, KeyError):
        return set()
    return {
        op["resource"]["urn"].rsplit("::", 1)[-1] for op in latest.get("pending_operations") or []
    }


def test_a_killed_pulumi_cli_leaves_pending_operations_named_and_cleared(
    twin, shipped_inventory, stacks, log
):
    """Injects: SIGKILL to the `pulumi` CLI running `up` when it reports its first resource
    created and the state holds a create still running (a Service whose endpoints Pulumi
    awaits, and none ever comes: without it, under load every create of the small stack can
    end before the first "created" event arrives, leaving nothing pending). Asserts: `up`
    fails saying the CLI was killed, and names each pending operation the state holds; the
    dead process's lock is reported with the command that clears it (never cleared here);
    once it is removed as the message says, the next `up` clears the pending operations
    (refresh --clear-pending-creates) and converges: no pending operation left, every
    namespace exists, and the `up` after it changes nothing."""
    cluster = shipped_inventory.clusters[CLUSTER]
    slow = threading.Event()
    slow.set()
    name, program = cluster_program(twin, shipped_inventory, stacks, slow=slow)
    killer = KillOnFirstCreate(
        pulumi_cli, until=lambda: "fault-slow" in pending_creates(stacks, name)
    )
    with pytest.raises(StackError) as info:
        stacks.up(name, program, killer)
    slow.clear()  # from here on, the Service's create no longer waits for endpoints
    message = str(info.value)
    assert "the Pulumi CLI was killed by signal 9" in message
    try:
        saved = json.loads(state_file(stacks, name).read_text())
    except json.JSONDecodeError:
        # Not expected: Pulumi renames a whole file over the state. Should a kill ever leave it
        # cut short, the next operation must name it with its recovery command
        # (tests/faults/test_stack_state.py covers that recovery in full).
        return _recover_damaged_state(stacks, name, program, log)
    pending = saved["checkpoint"]["latest"]["pending_operations"]
    assert "fault-slow" in {op["resource"]["urn"].rsplit("::", 1)[-1] for op in pending}
    assert f"Pulumi left {len(pending)} pending operation(s)" in message
    for op in pending:
        urn = op["resource"]["urn"]
        assert f"{op['type']} {op['resource']['type']} {urn.rsplit('::', 1)[-1]}" in message
    assert "clears them with refresh --clear-pending-creates" in message

    with pytest.raises((StackLockedError, StackStateError)) as locked:
        stacks.up(name, program, log)
    if isinstance(locked.value, StackStateError):
        # Seen under load in CI before backends ran with metadata=skip: the state read whole
        # above, but the kill had cut its .attrs sidecar short, and Pulumi could not load it
        # ("failed to load checkpoint: EOF"). Named with its recovery command, which must work.
        return _recover_damaged_state(stacks, name, program, log)
    assert "process gone" in str(locked.value) and "pulumi cancel --yes" in str(locked.value)
    (lock,) = stacks.locks(name)
    assert f"rm {lock.path}" in str(locked.value)
    lock.path.unlink()  # the documented recovery: the dead process's lock removed

    recovered = stacks.up(name, program, log)
    assert recovered.changed > 0
    latest = json.loads(state_file(stacks, name).read_text())["checkpoint"]["latest"]
    assert not latest.get("pending_operations")
    assert stacks.up(name, program, log).changed == 0
    core = client.CoreV1Api(twin.client(CLUSTER))
    assert set(cluster.namespaces) <= {n.metadata.name for n in core.list_namespace().items}


def _recover_damaged_state(stacks, name, program, log) -> None:
    with pytest.raises(StackStateError, match=f"homelab repair state {name}"):
        stacks.up(name, program, log)
    for lock in stacks.locks(name):  # the dead process's lock, as the lock error says
        lock.path.unlink()
    try:
        stacks.restore_state(name, log)
    except StackStateError as exc:
        # Seen once in CI (with .attrs sidecars): Pulumi could not load the state, yet it read
        # whole by the time the repair looked; the repair then keeps it, as any readable state.
        assert "is readable: kept" in str(exc)
    stacks.up(name, program, log)
    latest = json.loads(state_file(stacks, name).read_text())["checkpoint"]["latest"]
    assert not latest.get("pending_operations")
    assert stacks.up(name, program, log).changed == 0
