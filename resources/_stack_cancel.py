"""An interrupted stack operation cancels Pulumi cleanly before the interrupt goes on.

Dagster stops a step (the UI's *Terminate*, a run worker's SIGTERM) by raising an interrupt
in the step's main thread. The Pulumi CLI the Automation API runs is a child process that
the interrupt does not reach: left alone it would carry on (the step waiting for the whole
update), and killing it would leave operations pending in the state and its lock behind.

:func:`cancel_on_interrupt` holds SIGINT and SIGTERM while an operation runs. The first one
is passed to the Pulumi CLI as SIGINT, Pulumi's own graceful cancellation: it lets the
resource operations in flight finish, writes its checkpoint, releases the stack's lock and
exits. Then the interrupt is re-raised through the handler that was in place (Dagster's:
the step ends as interrupted). A SIGINT typed at a terminal already reached the CLI (same
foreground process group), so it is not passed again: a second SIGINT makes Pulumi abort at
once, mid-write. A lock the cancelled CLI still left (its process gone) is removed: it was
this operation's own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from resources._stack_locks import read_locks
from resources._stack_result import Log

__all__ = ["cancel_on_interrupt"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def cancel_on_interrupt(stack: str, backend: str, log: Log) -> Iterator[None]:
    """Run the body with interrupts deferred: the first SIGINT or SIGTERM cancels the
    stack's Pulumi CLI (SIGINT), the body waits for it to end, and the interrupt is raised
    afterwards (from the previous handler). Only in the main thread (elsewhere signals are
    not delivered, and the body runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[signal.Signals] = []
    cancelled: list[int] = []

    def defer(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum))
        if len(received) > 1:
            return  # never a second SIGINT: Pulumi would abort mid-write
        log.warning(
            f"{stack}: interrupted ({signal.Signals(signum).name}): cancelling the Pulumi "
            "update (the operations in flight finish and the state is saved), then stopping"
        )
        if signum == signal.SIGTERM or not _typed_at_terminal():
            cancelled.extend(_interrupt_pulumi_cli())

    previous = {s: signal.signal(s, defer) for s in _SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            _release_own_locks(stack, backend, cancelled, log)
            log.warning(f"{stack}: the Pulumi update was cancelled; its state is saved")
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)  # Dagster's: raises its interrupt
            raise KeyboardInterrupt


def _typed_at_terminal() -> bool:
    """Whether this process is in its terminal's foreground group (a Ctrl-C there is sent
    to the whole group, the Pulumi CLI included)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _interrupt_pulumi_cli() -> list[int]:
    """SIGINT to this process's child ``pulumi`` processes; their pids."""
    import psutil

    pids = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if Path(child.exe()).name == "pulumi":
                child.send_signal(signal.SIGINT)
                pids.append(child.pid)
    return pids


def _release_own_locks(stack: str, backend: str, pids: list[int], log: Log) -> None:
    """Remove the locks on ``stack`` that a cancelled CLI of ``pids`` left when it ended."""
    for lock in read_locks(backend, stack):
        if lock.pid in pids and lock.dead:
            lock.path.unlink(missing_ok=True)
            log.warning(f"{stack}: removed the lock {lock.path} of the cancelled Pulumi CLI")
