"""Who holds a stack's lock, and whether that process is still alive.

Pulumi's file (DIY) backend takes a lock per update: a file
``<backend>/.pulumi/locks/<org>/<project>/<stack>/<id>.json`` holding the owner's pid, user,
host and start time. A lock whose process has died (same host, pid gone) stays until someone
removes it: :func:`describe` says how, and nothing here ever removes one.
Other backends (Pulumi Cloud, S3, ...) report their lock only through the CLI's error, which
the caller passes on as it is.

The same backend keeps each stack's state, and Pulumi's own copies of it, which
:class:`StateFiles` finds (a stack damaged or deleted by hand is restored from them)::

    <backend>/.pulumi/stacks/<project>/<stack>.json            the state
    <backend>/.pulumi/history/<project>/<stack>/*.checkpoint.json  the state after each update
    <backend>/.pulumi/backups/<project>/<stack>/<stack>.<ns>.json  a copy after each save

Pulumi never prunes them; ``pulumi stack rm`` deletes the history and keeps the backups.

**Reads while another process writes.** Pulumi writes each of these files whole (a temporary
file renamed over it), but the storage library under it (gocloud's ``fileblob``) also keeps a
``<file>.attrs`` beside each one, rewritten in place on every write: a ``pulumi stack export``
(the drift watch) or ``stack select`` (a run's step) that reads it at that moment fails with
``failed to load checkpoint: EOF``. :func:`file_backend_url` turns those files off with the
library's ``metadata=skip`` option (Pulumi keeps nothing in them).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlparse

__all__ = [
    "StackLock",
    "StateFiles",
    "describe",
    "file_backend_root",
    "file_backend_url",
    "read_locks",
    "state_files",
]


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


def file_backend_url(backend_url: str) -> str:
    """``backend_url`` with ``metadata=skip`` where it is a ``file://`` backend that does not
    choose its ``metadata`` itself (no ``.attrs`` file beside each state file: see above);
    any other backend unchanged."""
    parsed = urlparse(backend_url)
    query = parse_qsl(parsed.query, keep_blank_values=True)
    if parsed.scheme != "file" or any(key == "metadata" for key, _ in query):
        return backend_url
    return parsed._replace(query=urlencode([*query, ("metadata", "skip")])).geturl()


def file_backend_root(backend_url: str) -> Path | None:
    """The directory of a ``file://`` backend; None for any other kind of backend."""
    parsed = urlparse(backend_url)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.netloc + parsed.path)).expanduser()


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
        f"with `cd {shlex.quote(str(work_dir))} && PULUMI_BACKEND_URL={shlex.quote(backend_url)} "
        f"pulumi cancel --yes --stack {stack}`, or remove the lock file: rm {files}"
    )


@dataclass(frozen=True)
class StateFiles:
    """Where a file backend keeps one stack's state, its history and its backups."""

    stack: str
    file: Path
    history: Path
    backups: Path

    def updates(self) -> int:
        """How many updates the history records (0: never updated, or removed with
        ``pulumi stack rm``)."""
        return len(list(self.history.glob("*.checkpoint.json")))

    def missing(self) -> bool:
        """True when the state file is gone although the history says the stack exists."""
        return not self.file.exists() and self.updates() > 0

    @property
    def sidecar(self) -> Path:
        """The storage library's ``.attrs`` file beside the state (a content type and a
        checksum; only states written without ``metadata=skip`` have one)."""
        return self.file.with_name(f"{self.file.name}.attrs")

    def damaged(self) -> bool:
        """True when the state file exists but is not a readable checkpoint, or its sidecar is
        cut short (a CLI killed while writing it): Pulumi cannot load either."""
        return self.file.exists() and (not self.readable() or self.sidecar_damaged())

    def readable(self) -> bool:
        """True when the state file is a readable checkpoint of the stack (its sidecar aside)."""
        return _checkpoint(self.file, self.stack) is not None

    def sidecar_damaged(self) -> bool:
        """True when the state's ``.attrs`` sidecar exists and is not JSON."""
        try:
            json.loads(self.sidecar.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True
        return False

    def pending_operations(self) -> list[str]:
        """The operations an interrupted update left in the state, by name
        (``creating kubernetes:core/v1:Namespace namespace-edge``); empty if unreadable."""
        deployment = _checkpoint(self.file, self.stack) if self.file.exists() else None
        pending = (deployment or {}).get("pending_operations") or []
        named = []
        for op in pending:
            resource = op.get("resource", {}) if isinstance(op, dict) else {}
            urn = str(resource.get("urn", "?"))
            named.append(
                f"{op.get('type', '?')} {resource.get('type', '?')} {urn.rsplit('::', 1)[-1]}"
            )
        return named

    def newest_copy(self) -> tuple[Path, Mapping[str, Any]] | None:
        """The newest readable copy of the state (backups and history, by modification
        time): its path and its deployment (what ``pulumi stack import`` takes)."""
        copies = [*self.backups.glob("*.json"), *self.history.glob("*.checkpoint.json")]
        for path in sorted(copies, key=lambda p: p.stat().st_mtime_ns, reverse=True):
            deployment = _checkpoint(path, self.stack)
            if deployment:
                return path, deployment
        return None


def state_files(backend_url: str, project: str, stack: str) -> StateFiles | None:
    """The state files of ``stack`` in a file backend (None for other backends)."""
    root = file_backend_root(backend_url)
    if root is None:
        return None
    meta = root / ".pulumi"
    return StateFiles(
        stack=stack,
        file=meta / "stacks" / project / f"{stack}.json",
        history=meta / "history" / project / stack,
        backups=meta / "backups" / project / stack,
    )


def _checkpoint(path: Path, stack: str) -> Mapping[str, Any] | None:
    """The deployment in the checkpoint file ``path`` of ``stack`` (empty for a stack never
    updated); None if the file is unreadable or not a checkpoint of ``stack``."""
    try:
        checkpoint = json.loads(path.read_text())["checkpoint"]
        latest = checkpoint.get("latest") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(latest, dict) or not str(checkpoint.get("stack", "")).endswith(f"/{stack}"):
        return None
    return latest
