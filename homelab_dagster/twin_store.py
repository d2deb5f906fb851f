"""The twin's S3 object store: versitygw over a directory, where the weights bucket lives.

The homelab keeps its weights in a MinIO bucket on Forge; the twin runs versitygw (an S3
gateway over a POSIX directory, built from its Go module by the toolchain: docs/twin.md says
why it and not rclone or MinIO), so the weights store, the serving pods' copy step and their
credentials take the homelab's path with only the address and the keys changed.

- **Where.** ``127.0.0.1:<port>``, the third port after the clusters' blocks
  (``HOMELAB_TWIN_PORT_BASE + 8 x clusters + 2``), for this machine's processes (Dagster's
  steps, the CLI). Where real nodes run, also on ``<pod address>:<port>``: an address on
  ``lo`` named by the port (:func:`~homelab_dagster.twin_host.loopback_address`), which a pod
  on a real node reaches through its bridge (the host answers for its own addresses on any
  interface). Nothing listens on another interface.
- **Keys.** Generated once into ``<state>/twin/store/credentials`` (mode 0600, the AWS
  shared-credentials format, ``[default]``); handed to versitygw in its environment (never on
  its command line, which any user can read), read by the weights store from the file, and
  never printed or logged.
- **Data.** ``<state>/twin/store/data`` (a bucket is a directory; an object's metadata and
  checksums are extended attributes, or files under ``sidecar/`` where the file system has
  none). ``twin down`` stops the process and keeps the data; ``--purge`` deletes it; ``up``
  restarts a store that died.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import secrets
import shutil
import string
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from homelab_dagster.errors import TwinStoreError
from homelab_dagster.twin_host import (
    add_loopback_address,
    alive,
    loopback_address,
    read_pid,
    remove_loopback_address,
    start_process,
    tail,
    terminate,
)

__all__ = ["ObjectStore", "StoreStatus", "read_credentials", "write_credentials"]

_START_TIMEOUT_S = 30
_KEY_ALPHABET = string.ascii_uppercase + string.digits


@dataclass(frozen=True)
class StoreStatus:
    """What ``twin status`` shows of the object store (never its keys)."""

    address: str
    pod_address: str | None  # where pods on real nodes reach it; None: loopback only
    running: bool
    answering: bool
    buckets: tuple[str, ...] = ()
    message: str = ""


def write_credentials(path: Path) -> None:
    """Generate an access key and a secret into ``path`` (0600, created without ever being
    readable by others), unless it exists."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    access = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(20))
    secret = secrets.token_urlsafe(30)
    text = f"[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def read_credentials(path: Path | str) -> tuple[str, str]:
    """(access key, secret) of the ``[default]`` profile of an AWS shared-credentials file.

    Raises:
        TwinStoreError: the file is missing or has no such keys (the message names the file
            and the field, never a value).
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as f:
            parser.read_file(f)
    except OSError as exc:
        raise TwinStoreError(
            f"cannot read the object store's credentials {path}: {exc.strerror} "
            "(`homelab twin up` writes them)"
        ) from None
    except configparser.Error:
        raise TwinStoreError(f"{path} is not an AWS shared-credentials file") from None
    section = parser["default"] if parser.has_section("default") else None
    for field in ("aws_access_key_id", "aws_secret_access_key"):
        if section is None or not section.get(field, "").strip():
            raise TwinStoreError(f"{path}: [default] has no {field}")
    assert section is not None
    return section["aws_access_key_id"].strip(), section["aws_secret_access_key"].strip()


class ObjectStore:
    """The twin's object store, kept under ``root`` (``<state>/twin/store``), on ``port``."""

    def __init__(self, root: Path, port: int, binary: Path) -> None:
        self.root = root
        self.port = port
        self.binary = binary  # the toolchain's versitygw
        self.address = f"127.0.0.1:{port}"
        self.pod_address = loopback_address(port)

    @property
    def credentials(self) -> Path:
        return self.root / "credentials"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def _pid_file(self) -> Path:
        return self.root / "store.pid"

    @property
    def _log(self) -> Path:
        return self.root / "store.log"

    @property
    def _listen_file(self) -> Path:
        return self.root / "listen"

    def running(self) -> bool:
        return alive(read_pid(self._pid_file), self.root)

    def answering(self) -> bool:
        """Whether it answers HTTP (an unsigned request gets S3's 403: it is up)."""
        try:
            with urllib.request.urlopen(f"http://{self.address}/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def up(self, *, for_pods: bool) -> str:
        """Start it, or restart it when it died, stopped answering or must now also listen for
        pods (``for_pods``: real nodes run); what was done.

        Raises:
            TwinStoreError: versitygw is not built, or did not answer in time.
        """
        listen = [self.address] + (
            [f"{self.pod_address}:{self.port}"] if for_pods and os.geteuid() == 0 else []
        )
        recorded = self._listen_file.read_text().split() if self._listen_file.exists() else []
        if self.running() and self.answering() and set(listen) <= set(recorded):
            return "running"
        if not self.binary.exists():
            raise TwinStoreError("versitygw is not built: run `make tools`")
        terminate(read_pid(self._pid_file), self.root)
        self.data.mkdir(parents=True, exist_ok=True)
        write_credentials(self.credentials)
        if len(listen) > 1:
            add_loopback_address(self.pod_address)
        access, secret = read_credentials(self.credentials)
        cmd = [str(self.binary)]
        for address in listen:
            cmd += ["--port", address]
        cmd += ["posix", *self._metadata_args(), str(self.data)]
        self._listen_file.write_text(" ".join(listen) + "\n")
        start_process(
            cmd,
            log=self._log,
            pid_file=self._pid_file,
            cwd=self.root,
            env={"ROOT_ACCESS_KEY_ID": access, "ROOT_SECRET_ACCESS_KEY": secret},
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.answering():
            if not self.running() or time.monotonic() > deadline:
                raise TwinStoreError(
                    f"the twin's object store did not answer on {self.address} (is the port "
                    "taken? choose others with HOMELAB_TWIN_PORT_BASE); its log "
                    f"({self._log}) ends:\n{tail(self._log)}"
                )
            time.sleep(0.1)
        return f"started on {' and '.join(listen)}"

    def stop(self, *, purge: bool = False) -> bool:
        """Stop it and take its pod address off ``lo`` (``purge``: delete its data and keys
        too); whether it was running."""
        was = self.running()
        terminate(read_pid(self._pid_file), self.root)
        self._pid_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            if self.pod_address in self._listen_file.read_text():
                remove_loopback_address(self.pod_address)
            self._listen_file.unlink()
        if purge:
            shutil.rmtree(self.root, ignore_errors=True)
        return was

    def status(self) -> StoreStatus:
        running = self.running()
        answering = running and self.answering()
        recorded = self._listen_file.read_text() if self._listen_file.exists() else ""
        buckets = (
            tuple(sorted(p.name for p in self.data.iterdir() if p.is_dir() and p.name[0] != "."))
            if self.data.is_dir()
            else ()
        )
        message = "" if answering else ("not answering" if running else "not running")
        return StoreStatus(
            self.address,
            self.pod_address if self.pod_address in recorded else None,
            running,
            answering,
            buckets,
            message,
        )

    def _metadata_args(self) -> list[str]:
        """versitygw keeps an object's metadata in extended attributes; where the data's file
        system has none, in a sidecar directory instead."""
        probe = self.data / ".xattr-probe"
        probe.touch()
        try:
            os.setxattr(probe, "user.homelab", b"1")
            return []
        except OSError:
            sidecar = self.root / "sidecar"
            sidecar.mkdir(exist_ok=True)
            return ["--sidecar", str(sidecar)]
        finally:
            probe.unlink(missing_ok=True)
