"""Fault: a stack's state file in the file backend truncated, or deleted, by hand.

What Pulumi keeps (and this project relies on, never prunes): the state after each update in
``.pulumi/history/homelab/<stack>/`` and a copy after each save in
``.pulumi/backups/homelab/<stack>/``. The damaged stack fails with the file and the restore
command (``homelab repair state <stack>``); nothing is re-created empty; the restore brings the
stack back to its last state, and the next ``up`` changes nothing.
"""

from __future__ import annotations

import pulumi
import pytest
from pulumi import automation as auto

from homelab_dagster.errors import StackStateError
from resources import _stack_locks
from resources.pulumi import PROJECT

from .conftest import homelab

pytestmark = [pytest.mark.faults, pytest.mark.twin]

STACK = "twin.fault.state"


def exporting(**values):
    def program() -> None:
        for name, value in values.items():
            pulumi.export(name, value)

    return program


def kept(files: _stack_locks.StateFiles) -> dict[str, bytes]:
    """Every copy Pulumi keeps of the stack's state, by name."""
    paths = [*files.history.glob("*"), *files.backups.glob("*")]
    return {p.name: p.read_bytes() for p in paths}


@pytest.fixture
def brought_up(stacks, log) -> _stack_locks.StateFiles:
    """STACK brought up twice (a=1, then a=2): a state, its history and its backups."""
    stacks.up(STACK, exporting(a=1), log, refresh=False)
    stacks.up(STACK, exporting(a=2), log, refresh=False)
    files = _stack_locks.state_files(stacks.backend, PROJECT, STACK)
    assert files is not None and files.updates() == 2 and list(files.backups.glob("*.json"))
    assert not files.sidecar.exists()  # metadata=skip: nothing rewritten in place
    return files


def test_a_truncated_state_is_named_with_its_restore_command_and_restored(
    stacks, log, brought_up, state_dir
):
    """Injects: the state file cut to its first 100 bytes. Asserts: `up` and `outputs` fail
    with StackStateError naming the file and `homelab repair state <stack>`; the history and
    backups are untouched; `homelab repair state` (the CLI) restores it, keeping the damaged
    file; the next `up` changes nothing and the outputs are back."""
    files = brought_up
    before = kept(files)
    damaged = files.file.read_bytes()[:100]
    files.file.write_bytes(damaged)

    for attempt in (
        lambda: stacks.up(STACK, exporting(a=2), log, refresh=False),
        lambda: stacks.outputs(STACK),
    ):
        with pytest.raises(StackStateError) as info:
            attempt()
        message = str(info.value)
        assert str(files.file) in message and "is damaged" in message
        assert f"homelab repair state {STACK}" in message and "Nothing was changed" in message
    assert kept(files) == before  # nothing Pulumi keeps was touched
    assert files.file.read_bytes() == damaged

    done = homelab(state_dir, "repair", "state", STACK)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored the state of twin.fault.state from" in done.stdout
    (saved,) = files.file.parent.glob(f"{STACK}.json.damaged.*")
    assert saved.read_bytes() == damaged

    assert stacks.outputs(STACK) == {"a": 2}
    again = stacks.up(STACK, exporting(a=2), log, refresh=False)
    assert again.changed == 0 and again.outputs == {"a": 2}


def test_a_deleted_state_is_not_recreated_empty_and_is_restored(stacks, log, brought_up):
    """Injects: the state file deleted (its history and backups left). Asserts: `up` fails
    with StackStateError naming the file and the restore command, and does not create a new
    empty stack (which would try to create everything again); `outputs` fails the same way
    instead of answering "no outputs"; `restore_state` brings back the last state; the next
    `up` changes nothing."""
    files = brought_up
    files.file.unlink()
    with pytest.raises(StackStateError) as info:
        stacks.up(STACK, exporting(a=2), log, refresh=False)
    message = str(info.value)
    assert "is missing" in message and str(files.file) in message
    assert f"homelab repair state {STACK}" in message and "2 update(s)" in message
    assert not files.file.exists()
    with pytest.raises(StackStateError, match="is missing"):
        stacks.outputs(STACK)

    source = stacks.restore_state(STACK, log)
    assert source.parent in (files.backups, files.history)
    again = stacks.up(STACK, exporting(a=2), log, refresh=False)
    assert again.changed == 0 and again.outputs == {"a": 2}


def test_repair_refuses_a_readable_state_and_a_stack_without_copies(stacks, log, brought_up):
    """Injects: nothing, then a damaged stack whose backups and history are gone too.
    Asserts: a readable state is never overwritten by a restore; with no copy left the
    restore says where it looked."""
    files = brought_up
    state = files.file.read_bytes()
    with pytest.raises(StackStateError, match="is readable: kept"):
        stacks.restore_state(STACK, log)
    assert files.file.read_bytes() == state

    files.file.write_text("{")
    for path in [*files.backups.glob("*"), *files.history.glob("*")]:
        path.unlink()
    with pytest.raises(StackStateError, match=f"no readable copy of {STACK}'s state in"):
        stacks.restore_state(STACK, log)


def test_a_cut_short_sidecar_is_named_and_repaired_keeping_the_state(stacks, log, brought_up):
    """Injects: an empty ``.attrs`` sidecar beside a whole state (what a CLI killed while
    writing one leaves, in a backend used without ``metadata=skip``). Asserts: Pulumi cannot
    load the state, and `up` says so with the restore command; the restore keeps the state
    itself and sets the sidecar aside; the next `up` changes nothing."""
    files = brought_up
    state = files.file.read_bytes()
    files.sidecar.write_text("")
    with pytest.raises(StackStateError, match=f"homelab repair state {STACK}"):
        stacks.up(STACK, exporting(a=2), log, refresh=False)

    assert stacks.restore_state(STACK, log) == files.file
    assert files.file.read_bytes() == state and not files.sidecar.exists()
    (saved,) = files.file.parent.glob(f"{files.sidecar.name}.damaged.*")
    assert saved.read_bytes() == b""
    again = stacks.up(STACK, exporting(a=2), log, refresh=False)
    assert again.changed == 0 and again.outputs == {"a": 2}


def test_a_state_caught_mid_write_is_not_called_damaged(stacks, brought_up):
    """The CLI's "failed to load checkpoint" while the file reads whole: another process was
    writing it at that moment. No restore is offered for a state that needs none."""
    failed = auto.CommandError(
        auto.CommandResult(stdout="", stderr="error: failed to load checkpoint: EOF", code=255)
    )
    assert stacks._state_error(STACK, failed) is None
    brought_up.file.write_text("{")
    assert isinstance(stacks._state_error(STACK, failed), StackStateError)
