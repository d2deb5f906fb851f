"""Who holds a stack's lock, and whether that process is still alive; whether a stack exists.

Pulumi's file (DIY) backend takes a lock per update: a file
``<backend>/.pulumi/locks/<org>/<project>/<stack>/<id>.json`` holding the owner's pid, user,
host and start time. A lock whose process has died (same host, pid gone) stays until someone
removes it: :func:`describe` says how, and nothing here ever removes one.
Other backends (Pulumi Cloud, S3, ...) report their lock only through the CLI's error, which
the caller passes on as it is.

The same backend keeps each stack's state in ``<backend>/.pulumi/stacks/<project>/<stack>.json``
(``.json.gz`` when compressed): :func:`stack_recorded` looks for it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["StackLock", "describe", "file_backend_root", "read_locks", "stack_recorded"]


@dataclass(frozen=True)
class StackLock:
    """One lock on a stack, as the file backend records it."""

    path: Path
    pid: int | None
    user: str
    host: str
    since: str

    @property
    def local(self) -> bool:
        """Whether the lock's process ran on this host (so its liveness can be checked)."""
        return self.host == socket.gethostname()

    @property
    def dead(self) -> bool:
        """True when the owner ran here and its process no longer exists."""
        if not self.local or self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            return False
        return False

    def owner(self) -> str:
        """``user@host (pid N, since T)``, or that the process is gone."""
        state = ", process gone" if self.dead else ""
        return f"{self.user}@{self.host} (pid {self.pid}{state}, since {self.since})"


def file_backend_root(backend_url: str) -> Path | None:
    """The directory of a ``file://`` backend; None for any other kind of backend."""
    parsed = urlparse(backend_url)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.netloc + parsed.path)).expanduser()


def stack_recorded(backend_url: str, project: str, stack: str) -> bool:
    """Whether a file backend holds ``stack`` of ``project`` (False for other backends: only
    the CLI can tell there)."""
    root = file_backend_root(backend_url)
    if root is None:
        return False
    stacks = root / ".pulumi" / "stacks" / project
    return any((stacks / f"{stack}{suffix}").is_file() for suffix in (".json", ".json.gz"))


def read_locks(backend_url: str, stack: str) -> list[StackLock]:
    """The locks on ``stack`` in a file backend (none for other backends or when unlocked)."""
    root = file_backend_root(backend_url)
    if root is None:
        return []
    locks = []
    for path in sorted((root / ".pulumi" / "locks").glob(f"**/{stack}/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # released while we read it, or half written
            continue
        pid = data.get("pid")
        locks.append(
            StackLock(
                path=path,
                pid=pid if isinstance(pid, int) else None,
                user=str(data.get("username", "?")),
                host=str(data.get("hostname", "?")),
                since=str(data.get("timestamp", "?")),
            )
        )
    return locks


def describe(stack: str, locks: list[StackLock], work_dir: Path, backend_url: str) -> str:
    """Who holds ``stack``'s lock, and the commands that clear a dead owner's lock."""
    owners = "; ".join(lock.owner() for lock in locks) or "an update in progress"
    dead = [lock for lock in locks if lock.dead]
    if not dead:
        return f"stack {stack} is locked by {owners}"
    files = " ".join(str(lock.path) for lock in dead)
    return (
        f"stack {stack} is locked by {owners}: the process that took the lock is gone, so the "
        "lock will not be released by itself. Check that no update is running, then clear it "
        f"with `cd {work_dir} && PULUMI_BACKEND_URL={backend_url} pulumi cancel --yes --stack "
        f"{stack}`, or remove the lock file: rm {files}"
    )
