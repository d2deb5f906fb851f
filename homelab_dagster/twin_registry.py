"""The twin's image registry: Debian's ``docker-registry`` (distribution 2.8) on loopback.

It holds the images built from the lock files (``infra/images.py``, ``homelab twin images``)
under their homelab names (``ghcr.io/homelab/homelab-dagster:0.1.0`` is stored as the
repository ``ghcr.io/homelab/homelab-dagster``), and the real nodes' containerd resolves the
homelab's registries through it (:func:`homelab_dagster.images.mirror_hosts_toml`), so the same
manifests pull locally on the twin.

It listens on ``127.0.0.1:<port>``, the first port after the clusters' port blocks
(``HOMELAB_TWIN_PORT_BASE + 8 x clusters``: 16483 for the shipped five clusters), plain HTTP
(loopback only). Its configuration, storage, log and pid live under ``<state>/twin/registry``;
:meth:`Registry.up` starts it or restarts it when it died, :meth:`Registry.stop` stops it
(its storage kept unless ``purge``). :class:`RegistryClient` is its HTTP API alone, by address:
what a step asks before it deploys (:meth:`RegistryClient.require`) and what ``twin status``
lists (:meth:`RegistryClient.images`).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from homelab_dagster.errors import ImageMissingError, TwinRegistryError
from homelab_dagster.images import IMAGES, registry_path
from homelab_dagster.twin_host import alive, read_pid, start_process, tail, terminate

__all__ = ["APT_PACKAGE", "Registry", "RegistryClient", "RegistryStatus"]

APT_PACKAGE = "docker-registry"  # what `make system-deps` installs (/usr/bin/docker-registry)
_BINARY = "docker-registry"
_START_TIMEOUT_S = 30
# The manifest types a HEAD for a digest accepts (OCI first: umoci's images are OCI).
_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


@dataclass(frozen=True)
class RegistryStatus:
    """What ``twin status`` shows of the registry."""

    address: str
    running: bool
    answering: bool
    message: str = ""


class RegistryClient:
    """The twin's registry's HTTP API at ``address`` (``127.0.0.1:<port>``)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def answering(self) -> bool:
        """Whether it answers the registry API (``GET /v2/``)."""
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def manifest_digest(self, repository: str, tag: str) -> str | None:
        """The digest of ``repository:tag``'s manifest here, or None when it has none."""
        request = urllib.request.Request(
            f"http://{self.address}/v2/{repository}/manifests/{tag}",
            method="HEAD",
            headers={"Accept": _MANIFEST_TYPES},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.headers.get("Docker-Content-Digest")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise TwinRegistryError(f"{self.address}: HEAD {repository}:{tag}: {exc}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from exc

    def require(self, reference: str) -> str:
        """The digest of image ``reference`` (a homelab name) here.

        Raises:
            ImageMissingError: the registry lacks it; the message names the command.
            TwinRegistryError: the registry does not answer.
        """
        repository, _, tag = registry_path(reference).rpartition(":")
        digest = self.manifest_digest(repository, tag)
        if digest is None:
            names = [n for n, spec in IMAGES.items() if spec.reference == reference]
            command = (
                f"homelab twin images {names[0]}"
                if names
                else f"skopeo copy --dest-tls-verify=false <source> "
                f"docker://{self.address}/{registry_path(reference)}"
            )
            raise ImageMissingError(reference, self.address, command, built_here=bool(names))
        return digest

    def images(self) -> dict[str, str]:
        """Every image here, as the homelab names it (``ghcr.io/homelab/x:1``), to its
        manifest digest.

        Raises:
            TwinRegistryError: the registry does not answer.
        """
        found: dict[str, str] = {}
        for repository in self._get("_catalog?n=1000").get("repositories") or []:
            for tag in self._get(f"{repository}/tags/list").get("tags") or []:
                digest = self.manifest_digest(repository, tag)
                if digest is not None:
                    found[f"{repository}:{tag}"] = digest
        return found

    def _get(self, path: str) -> dict[str, list[str] | None]:
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/{path}", timeout=10) as r:
                return dict(json.load(r))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # a repository whose tags were all deleted
                return {}
            raise TwinRegistryError(f"{self.address}: GET /v2/{path}: {exc}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: BaseException) -> TwinRegistryError:
        return TwinRegistryError(
            f"the twin's registry on {self.address} does not answer ({exc}): "
            "`homelab twin up` starts it"
        )


class Registry(RegistryClient):
    """The twin's registry, kept under ``root`` (``<state>/twin/registry``), on ``port``:
    its process, configuration and storage."""

    def __init__(self, root: Path, port: int) -> None:
        # 127.0.0.1:<port>: what skopeo pushes to and containerd's mirrors name.
        super().__init__(f"127.0.0.1:{port}")
        self.root = root
        self.port = port

    @property
    def _pid_file(self) -> Path:
        return self.root / "registry.pid"

    @property
    def _log(self) -> Path:
        return self.root / "registry.log"

    def running(self) -> bool:
        return alive(read_pid(self._pid_file), self.root)

    def up(self) -> str:
        """Start it, or restart it when its process died or stopped answering; what was done.

        Raises:
            TwinRegistryError: docker-registry is not installed, or did not answer in time.
        """
        if self.running() and self.answering():
            return "running"
        binary = shutil.which(_BINARY, path="/usr/bin:/usr/local/bin:/usr/sbin")
        if binary is None:
            raise TwinRegistryError(
                f"{_BINARY} is not installed: `make system-deps` (apt-get install -y {APT_PACKAGE})"
            )
        terminate(read_pid(self._pid_file), self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        start_process(
            [binary, "serve", str(config)], log=self._log, pid_file=self._pid_file, cwd=self.root
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.answering():
            if not self.running() or time.monotonic() > deadline:
                raise TwinRegistryError(
                    f"the twin's registry did not answer on {self.address} (is the port "
                    f"taken? choose others with HOMELAB_TWIN_PORT_BASE); its log "
                    f"({self._log}) ends:\n{tail(self._log)}"
                )
            time.sleep(0.1)
        return f"started on {self.address}"

    def stop(self, *, purge: bool = False) -> bool:
        """Stop it (``purge``: delete its storage too); whether it was running."""
        was = self.running()
        terminate(read_pid(self._pid_file), self.root)
        self._pid_file.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.root, ignore_errors=True)
        return was

    def status(self) -> RegistryStatus:
        running = self.running()
        answering = running and self.answering()
        message = "" if answering else ("not answering" if running else "not running")
        return RegistryStatus(self.address, running, answering, message)

    def _write_config(self) -> Path:
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.address},
            "health": {"storagedriver": {"enabled": False}},
        }
        path = self.root / "config.yml"
        path.write_text(yaml.safe_dump(config))
        return path
