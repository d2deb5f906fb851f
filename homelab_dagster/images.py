"""The images the homelab runs, by name: their references, what goes into them, and how the
twin's nodes reach them.

An image has one reference, the homelab's (``ghcr.io/homelab/homelab-dagster:0.1.0``), used
by the manifests on the homelab and on the twin alike. On the twin, containerd resolves the
homelab's registries (:data:`MIRRORED_REGISTRIES`) through the twin's own registry on
loopback (:mod:`homelab_dagster.twin_registry`), where ``infra/images.py`` pushes what it
builds from the lock files; the root ``Dockerfile`` builds the same image for the homelab,
from the same package list and uv flags (:data:`BASE_PACKAGES`, :data:`UV_SYNC_FLAGS`).

:func:`oci_archive` makes a tiny one-layer image from files of this machine (the pause
image, the real-node tests' busybox), imported into a node's containerd without a registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "APP_DIR",
    "BASE_PACKAGES",
    "DEBIAN_SUITE",
    "IMAGES",
    "IMAGE_PATH",
    "MIRRORED_REGISTRIES",
    "PROJECT_ROOT",
    "UV_SYNC_FLAGS",
    "ImageSpec",
    "image_reference",
    "mirror_hosts_toml",
    "oci_archive",
    "registry_path",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The registries whose names the homelab's manifests use; the twin's containerd resolves them
# through the twin's registry only (a name it lacks fails to pull at once: nothing is asked of
# the internet).
# registry.k8s.io holds the pause image, which the twin imports into each real node instead:
# one lost (containerd's image GC) fails at once, not after DNS's timeouts.
MIRRORED_REGISTRIES = ("ghcr.io", "docker.io", "registry.k8s.io")
# The base of every image (and of the Dockerfile): Debian's Python, no compiler, no apt lists.
DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3.11", "ca-certificates", "libgomp1", "libnuma1")
# `uv sync` in an image: exactly the lock, no dev group, the project's packages as wheels.
UV_SYNC_FLAGS = ("--locked", "--no-dev", "--no-editable")
# Where the environment lives in an image, and the image's PATH.
APP_DIR = "/app"
IMAGE_PATH = f"{APP_DIR}/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageSpec:
    """One image built from a uv project's lock file.

    ``project`` is the uv project's directory (relative to the repository's root); ``sources``
    are the paths of it copied into the image besides ``pyproject.toml`` and ``uv.lock`` (the
    project's own packages, installed as wheels); ``tag`` is the project's version, stated
    here because the images that load this module (the project's own) hold no other
    project's ``pyproject.toml``; ``extras`` are the project's optional dependency groups the
    image installs besides its dependencies.
    """

    name: str
    repository: str
    project: str
    tag: str
    sources: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()

    @property
    def sync_flags(self) -> tuple[str, ...]:
        """``uv sync``'s flags for this image: :data:`UV_SYNC_FLAGS` and its extras."""
        return (*UV_SYNC_FLAGS, *(f"--extra={extra}" for extra in self.extras))

    @property
    def project_dir(self) -> Path:
        return PROJECT_ROOT / self.project

    def version(self) -> str:
        """The uv project's ``[project].version``: what :attr:`tag` must be (a test keeps
        them equal; an image holds no other project's ``pyproject.toml`` to read it from)."""
        with (self.project_dir / "pyproject.toml").open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"


_PROJECT_SOURCES = ("README.md", "homelab_dagster", "assets", "resources", "sensors", "infra")

IMAGES: dict[str, ImageSpec] = {
    spec.name: spec
    for spec in (
        # This project: its code location, CLI and step code (no `ml` extra, no dev group).
        ImageSpec(
            "homelab-dagster", "ghcr.io/homelab/homelab-dagster", ".", "0.1.0", _PROJECT_SOURCES
        ),
        # The training pods' image: the same project with the `ml` extra (torch, transformers,
        # peft), from the same lock file; its entry point is homelab_dagster.ml.pod.
        ImageSpec(
            "homelab-training",
            "ghcr.io/homelab/homelab-training",
            ".",
            "0.1.0",
            _PROJECT_SOURCES,
            extras=("ml",),
        ),
        # vLLM's CPU build, the twin's stand-in for vLLM's CUDA image on the homelab.
        ImageSpec("vllm-cpu", "ghcr.io/homelab/vllm-cpu", "images/vllm-cpu", "0.32.0"),
    )
}


def image_reference(name: str) -> str:
    """The reference of image ``name`` (a key of :data:`IMAGES`), as the manifests use it."""
    try:
        return IMAGES[name].reference
    except KeyError:
        raise KeyError(f"no image {name!r}; known: {', '.join(IMAGES)}") from None


def registry_path(reference: str) -> str:
    """Where ``reference`` lives in the twin's registry: under its registry's host name
    (``ghcr.io/homelab/x:1``, ``docker.io/library/x:1``), so that two registries' names never
    collide; the mirror configuration (:func:`mirror_hosts_toml`) asks for the same path."""
    first, _, rest = reference.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        first, rest = "docker.io", reference  # Docker's short names
    if first == "docker.io" and "/" not in rest.rsplit(":", 1)[0]:
        rest = f"library/{rest}"
    return f"{first}/{rest}"


def mirror_hosts_toml(registry_host: str, mirror: str) -> str:
    """containerd's ``certs.d/<registry_host>/hosts.toml``: resolve and pull ``registry_host``'s
    images from the twin's registry at ``mirror`` (``127.0.0.1:<port>``, plain HTTP), and from
    nowhere else.

    The twin's registry is both the ``[host]`` tried first and the ``server`` tried last:
    containerd falls through from its hosts to the server, so with the homelab's registry as
    the server a name the twin lacks was asked of the internet (``lookup ghcr.io: no such
    host``, after DNS's timeouts). Now it fails at once with the registry's own answer
    (``... not found``). The ``[host]`` stays: containerd 1.6 refuses a file without one
    (``invalid `host` tree``) and then uses the registry's own address.
    """
    source = f"http://{mirror}/v2/{registry_host}"
    return (
        f"# Written by homelab_dagster/twin_real.py: {registry_host} from the twin's registry "
        "only.\n"
        f'server = "{source}"\n'
        'capabilities = ["pull", "resolve"]\n'
        "override_path = true\n\n"
        f'[host."{source}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        "  override_path = true\n"
    )


def oci_archive(
    name: str,
    files: dict[str, Path | str],
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
) -> bytes:
    """A one-layer OCI image archive, as ``ctr images import`` takes it, named ``name``.

    ``files`` maps a path in the image to a file on this machine (copied, mode kept) or, for a
    ``str`` value starting with ``->``, a symlink target (``{"bin/sh": "->busybox"}``).
    The layer is reproducible (fixed mtimes and owners), so the same files give the same digest.
    """
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for target in sorted(files):
            parts = target.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    dirs.add(d)
            source = files[target]
            info = tarfile.TarInfo(target.strip("/"))
            if isinstance(source, str) and source.startswith("->"):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, source[2:], 0o777
                tar.addfile(info)
            else:
                data = Path(source).read_bytes()
                info.size, info.mode = len(data), Path(source).stat().st_mode & 0o7777
                tar.addfile(info, io.BytesIO(data))
    layer = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    blob = gzip.compress(layer, mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": ["PATH=/bin:/usr/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()

    def descriptor(media: str, data: bytes, **extra: Any) -> dict[str, Any]:
        return {
            "mediaType": media,
            "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data),
            **extra,
        }

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", blob)],
        },
        sort_keys=True,
    ).encode()
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                descriptor(
                    "application/vnd.oci.image.manifest.v1+json",
                    manifest,
                    annotations={
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": tag,
                    },
                    platform={"architecture": "amd64", "os": "linux"},
                )
            ],
        }
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:

        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for data in (config, manifest, blob):
            add(f"blobs/sha256/{hashlib.sha256(data).hexdigest()}", data)
    return out.getvalue()
