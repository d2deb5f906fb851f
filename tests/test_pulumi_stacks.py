"""The Pulumi resource with the real CLI (the twin's toolchain), on programs without clusters:
locks, the one-program-per-process guard, failures, outputs, and the commands each operation
runs through the public Automation API."""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time

import pulumi
import pytest

from homelab_dagster.errors import StackError, StackLockedError
from resources.pulumi import PulumiStacks

pytestmark = pytest.mark.twin


@pytest.fixture
def stacks(tmp_path, toolchain, monkeypatch) -> PulumiStacks:
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    return PulumiStacks(
        target="test",
        state_dir=str(tmp_path),
        backend_url=f"file://{tmp_path}/pulumi/backend",
        passphrase_file=str(tmp_path / "pulumi" / "passphrase"),
        generate_passphrase=True,
        lock_wait_s=1.5,
        lock_poll_s=0.2,
    )


def exporting(**values):
    """A program exporting ``values`` (callables are called inside the program)."""

    def program() -> None:
        for name, value in values.items():
            pulumi.export(name, value() if callable(value) else value)

    return program


def lock_file(stacks: PulumiStacks, stack: str, pid: int):
    path = (
        stacks.root
        / "backend"
        / ".pulumi"
        / "locks"
        / "organization"
        / "homelab"
        / stack
        / "x.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    host = os.uname().nodename
    path.write_text(json.dumps({"pid": pid, "username": "ops", "hostname": host, "timestamp": "t"}))
    return path


def test_up_records_outputs_with_secrets_masked(stacks):
    log = logging.getLogger("test")
    program = exporting(
        plain="visible",
        token=lambda: pulumi.Output.secret("s3cr3t-value"),
        nested=lambda: {"user": "ops", "password": pulumi.Output.secret("s3cr3t-value")},
    )
    result = stacks.up("test.outputs", program, log, refresh=False)
    masked = {
        "plain": "visible",
        "token": "[secret]",
        "nested": {"user": "ops", "password": "[secret]"},
    }
    assert result.outputs == masked
    assert stacks.outputs("test.outputs") == masked
    assert "s3cr3t-value" not in json.dumps(result.metadata()["pulumi_outputs"].value)
    again = stacks.up("test.outputs", program, log, refresh=False)
    assert again.changed == 0 and again.changes == {"same": 1}
    assert again.outputs == masked  # the engine reports the outputs of an unchanged stack too
    # The state is encrypted with the generated passphrase, which is nowhere in the state.
    passphrase = (stacks.root / "passphrase").read_text().strip()
    state = "".join(p.read_text() for p in (stacks.root / "backend").rglob("*.json"))
    assert passphrase not in state and "s3cr3t-value" not in state


def test_a_live_lock_is_waited_for_then_fails_naming_its_owner(stacks):
    log = logging.getLogger("test")
    stacks.up("test.locked", exporting(a=1), log, refresh=False)
    path = lock_file(stacks, "test.locked", os.getpid())
    started = time.monotonic()
    with pytest.raises(StackLockedError, match=rf"locked by ops@.*\(pid {os.getpid()}, since t\)"):
        stacks.up("test.locked", exporting(a=2), log, refresh=False)
    assert time.monotonic() - started >= stacks.lock_wait_s
    path.unlink()  # the other update ends
    assert stacks.up("test.locked", exporting(a=2), log, refresh=False).outputs == {"a": 2}


def test_a_dead_processs_lock_is_reported_not_cleared(stacks):
    log = logging.getLogger("test")
    stacks.up("test.dead", exporting(a=1), log, refresh=False)
    path = lock_file(stacks, "test.dead", 4_000_000)
    with pytest.raises(StackLockedError) as info:
        stacks.up("test.dead", exporting(a=2), log, refresh=False)
    assert "process gone" in str(info.value) and "pulumi cancel --yes --stack test.dead" in str(
        info.value
    )
    assert path.exists()


def test_one_inline_program_at_a_time_in_a_process(stacks):
    log = logging.getLogger("test")
    running, most = [0], [0]
    guard = threading.Lock()

    def program() -> None:
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.5)
        with guard:
            running[0] -= 1

    threads = [
        threading.Thread(
            target=stacks.up, args=(f"test.thread{i}", program, log), kwargs={"refresh": False}
        )
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert stacks.outputs("test.thread0") == {} and stacks.outputs("test.thread1") == {}


def test_a_failing_program_fails_with_its_reason_and_leaves_the_stack_unlocked(stacks):
    log = logging.getLogger("test")

    def broken() -> None:
        raise ValueError("the inventory says no")

    with pytest.raises(StackError, match="the inventory says no"):
        stacks.up("test.broken", broken, log, refresh=False)
    assert stacks.locks("test.broken") == []
    assert stacks.up("test.broken", exporting(ok=True), log, refresh=False).outputs == {"ok": True}


def test_a_stack_never_brought_up_has_no_outputs_and_nothing_to_destroy(stacks):
    log = logging.getLogger("test")
    assert stacks.outputs("test.never") == {}
    result = stacks.destroy("test.never", log)
    assert result.changes == {} and result.changed == 0
    assert not list((stacks.root / "backend").rglob("test.never.json"))  # not created either


def test_operations_run_the_automation_apis_commands_and_never_read_secrets(
    tmp_path, toolchain, monkeypatch
):
    # Stacks are opened and run through the public Automation API only: each operation selects
    # its stack, then runs the SDK's commands for it. A `pulumi` on PATH that records its
    # arguments shows which: the cost of the public route (the pinned SDK's, one CLI run each),
    # and that secrets are asked for only where the SDK itself does (UpResult.outputs).
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    calls = tmp_path / "calls"
    shim = tmp_path / "bin" / "pulumi"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {toolchain.pulumi} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")
    stacks = PulumiStacks(
        target="test",
        state_dir=str(tmp_path),
        passphrase_file=str(tmp_path / "pulumi" / "passphrase"),
        generate_passphrase=True,
        use_toolchain=False,  # the `pulumi` on PATH: the recording one
    )
    log = logging.getLogger("test")
    program = exporting(a=1, token=lambda: pulumi.Output.secret("s3cr3t-value"))

    def commands() -> list[str]:
        """Each run's subcommand (``stack output``), and ``--show-secrets`` where given."""
        ran = calls.read_text().splitlines() if calls.exists() else []
        calls.unlink(missing_ok=True)
        named = []
        for line in ran:
            words = [w for w in line.split() if w != "--non-interactive"]
            name = " ".join(itertools.takewhile(lambda w: not w.startswith("-"), words))
            named.append(name + (" --show-secrets" if "--show-secrets" in words else ""))
        return [n for n in named if n != "version"]  # asked once per process

    summary = ["stack output", "stack output --show-secrets", "stack history"]
    stacks.up("test.public", program, log, refresh=False)
    assert commands() == ["stack select", "stack init test.public", "up", *summary]
    result = stacks.up("test.public", program, log, refresh=False)
    assert commands() == ["stack select", "up", *summary]
    assert result.changes == {"same": 1} and result.outputs == {"a": 1, "token": "[secret]"}
    stacks.preview("test.public", program, log)
    assert commands() == ["stack select", "preview"]
    assert stacks.outputs("test.public") == {"a": 1, "token": "[secret]"}
    assert commands() == ["stack select", "stack output"]  # never --show-secrets
    stacks.refresh("test.public", program, log)
    assert commands() == ["stack select", "refresh", "stack history"]
    # Settings gone (the passphrase's salt): the CLI restores them from the state.
    (stacks.work_dir("test.public") / "Pulumi.test.public.yaml").unlink()
    assert stacks.up("test.public", program, log, refresh=False).changed == 0
    commands()
    assert stacks.destroy("test.public", log, remove=True).changes == {"delete": 1}
    assert commands() == ["stack select", "destroy", "stack history", "stack rm"]
