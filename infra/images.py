"""The twin's images, built here from lock files and pushed to the twin's registry.

Each image of :data:`homelab_dagster.images.IMAGES` is three OCI layers:

1. **base**: Debian (``mmdebstrap --variant=minbase``) with the Debian packages of
   :data:`~homelab_dagster.images.BASE_PACKAGES` (Debian's own Python 3.11), shared by every
   image;
2. **dependencies**: the environment ``/app/.venv`` with every locked dependency and not the
   project, ``uv sync --locked --no-dev --no-editable --no-install-project`` from
   ``pyproject.toml`` and ``uv.lock`` alone (gigabytes for the training image: torch);
3. **project**: the project's sources in ``/app`` and the project itself installed into that
   environment (the same ``uv sync`` without ``--no-install-project``): kilobytes.

This is uv's documented two-step build for Docker's layer cache, and the ``Dockerfile`` runs
the same two commands. A change to the sources rebuilds only the project layer, and a node
that holds the image pulls only that layer again. Each ``uv sync`` runs *inside* the image's
root file system (``chroot``, in a private mount namespace that bind-mounts this machine's uv
cache), so the environment is made for the image's own interpreter at its own paths.
(``uv venv --relocatable`` with ``--python`` pointing into the root file system was the other
way; its scripts and ``pyvenv.cfg`` would name this machine's paths.)

``umoci`` packs them (``raw add-layer`` for the base, ``unpack`` + ``repack`` for the others)
into one OCI layout, ``${XDG_CACHE_HOME:-~/.cache}/homelab-dagster/images/oci``, tagged by
content: the base by its suite, packages and builder version; the dependencies by the base,
``uv.lock``, the parts of ``pyproject.toml`` uv reads, the uv flags and the builder version; an
image by its dependencies and its copied sources. ``skopeo`` pushes a tag to the twin's
registry under the homelab's name (``--preserve-digests``), unless the registry already has
that manifest (layers it has are not sent again). An unchanged lock file and sources cost a
hash and one HEAD.

    python -m infra.images                    # build every image (no push)
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from homelab_dagster.errors import ImageBuildError
from homelab_dagster.images import (
    APP_DIR,
    BASE_PACKAGES,
    DEBIAN_SUITE,
    IMAGE_PATH,
    IMAGES,
    ImageSpec,
    registry_path,
)

__all__ = [
    "APT_PACKAGES",
    "BUILDER_VERSION",
    "ImageBuilder",
    "ImageResult",
    "cache_root",
    "missing_tools",
]

# Bumped when what the builder does changes, so every cached image is rebuilt once.
BUILDER_VERSION = "2"
# What `uv sync` reads of pyproject.toml (its tools' settings, pytest's say, change no layer).
_UV_READS = ("project", "build-system", "dependency-groups")
# What `make system-deps` installs for the builder (Debian package names).
APT_PACKAGES = ("mmdebstrap", "umoci", "skopeo")
_TOOLS = ("mmdebstrap", "umoci", "skopeo", "unshare", "chroot")
# Documentation, manual pages and translations are left out of the base (dpkg path-exclude).
_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
# Environment of `uv sync` in the image's root file system.
_UV_CACHE_IN_ROOT = "/.uv-cache"
_HOST_CA = "/.host-ca.crt"
_KEEP = 3  # tags kept per image in the cache
_UV_ENV = {
    "UV_PYTHON": "/usr/bin/python3.11",
    "UV_PYTHON_DOWNLOADS": "never",
    "UV_LINK_MODE": "copy",  # the cache is another mount: no hard links
    "UV_PROJECT_ENVIRONMENT": f"{APP_DIR}/.venv",
    "UV_CACHE_DIR": _UV_CACHE_IN_ROOT,
    "UV_NO_PROGRESS": "1",
    "SSL_CERT_FILE": _HOST_CA,
    "HOME": "/root",
    "PATH": IMAGE_PATH,
}
# Installed distributions, read inside the image by its own interpreter (also a smoke test).
_LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps(sorted({d.metadata['Name'].lower().replace('_', '-'): d.version "
    "for d in m.distributions()}.items())))"
)

Progress = Callable[[str, str], None]


class RegistryLike(Protocol):
    """What pushing needs of the twin's registry (``twin_registry.Registry``)."""

    @property
    def address(self) -> str: ...

    def manifest_digest(self, repository: str, tag: str) -> str | None: ...


@dataclass(frozen=True)
class ImageResult:
    """What the builder did for one image: ``built`` False is a cache hit, ``pushed`` False
    means the registry had the manifest already (or nothing was pushed)."""

    name: str
    reference: str
    tag: str  # in the cache's layout
    digest: str
    built: bool
    pushed: bool
    size: int  # compressed bytes of its layers
    seconds: float
    distributions: dict[str, str] = field(default_factory=dict, repr=False)


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/homelab-dagster/images`` (as infra/toolchain.py's tools)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "homelab-dagster" / "images"


def missing_tools() -> str | None:
    """Why images cannot be built here (and how to fix it), or None when they can."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "building images needs root on Linux (mmdebstrap, chroot, mount namespaces)"
    missing = [t for t in _TOOLS if not shutil.which(t, path=_path())]
    if missing:
        return (
            f"missing {', '.join(missing)}: `make system-deps` "
            f"(apt-get install -y {' '.join(APT_PACKAGES)})"
        )
    if _uv() is None:
        return "uv is not installed (`make uv`)"
    return None


class ImageBuilder:
    """Builds images into the cache's OCI layout and pushes them to a registry."""

    def __init__(self, cache: Path | None = None, progress: Progress | None = None) -> None:
        self.cache = cache or cache_root()
        self.layout = self.cache / "oci"
        self.report = progress or (lambda _n, _m: None)

    # ------------------------------------------------------------------ keys

    def base_key(self) -> str:
        """The base's tag: its suite, packages and the builder's version."""
        return _digest(["base", BUILDER_VERSION, DEBIAN_SUITE, *BASE_PACKAGES, *_EXCLUDES])[:16]

    def dependencies_key(self, spec: ImageSpec) -> str:
        """The dependencies layer's tag: the base, the lock file, what uv reads of
        ``pyproject.toml``, uv and its flags."""
        parts: list[str | bytes] = [spec.name, BUILDER_VERSION, self.base_key(), *spec.sync_flags]
        parts += [_uv_version(), _uv_reads(spec), _required(spec, "uv.lock").read_bytes()]
        return _digest(parts)[:16]

    def image_key(self, spec: ImageSpec) -> str:
        """The image's tag: its dependencies and every file copied into it."""
        parts: list[str | bytes] = [spec.name, self.dependencies_key(spec)]
        for path in _project_files(spec):
            parts += [str(path.relative_to(spec.project_dir)), path.read_bytes()]
        return _digest(parts)[:16]

    def current(self, spec: ImageSpec) -> str | None:
        """The manifest digest that ``spec``'s lock file and sources give, where the cache
        holds that build (None: not built from them here yet). Needs no build tools."""
        tag = f"{spec.name}-{self.image_key(spec)}"
        return self._manifest(tag)[0] if tag in self._tags() else None

    # ------------------------------------------------------------------ build

    def build(self, spec: ImageSpec) -> ImageResult:
        """The image in the layout, built unless its tag is there already.

        Raises:
            ImageBuildError: a step failed; the message ends with its output.
        """
        why = missing_tools()
        if why:
            raise ImageBuildError(spec.name, why)
        start = time.monotonic()
        tag = f"{spec.name}-{self.image_key(spec)}"
        with self._locked():
            built = tag not in self._tags()
            if built:
                try:
                    base = self._ensure_base(spec.name)
                    dependencies = self._ensure_dependencies(spec, base)
                    self._build_project(spec, dependencies, tag)
                finally:
                    shutil.rmtree(self.cache / "work", ignore_errors=True)
                self._prune(spec.name, keep=tag)
            else:
                self.report(spec.name, "cached (the lock file and sources are unchanged)")
            digest, size = self._manifest(tag)
        record = self.cache / "records" / f"{tag}.json"
        distributions = json.loads(record.read_text())["distributions"]
        return ImageResult(
            spec.name,
            spec.reference,
            tag,
            digest,
            built,
            False,
            size,
            time.monotonic() - start,
            dict(distributions),
        )

    def push(self, result: ImageResult, registry: RegistryLike) -> ImageResult:
        """Push a built image to ``registry`` under its homelab name, unless it is there."""
        spec = IMAGES[result.name]
        repository, _, tag = registry_path(spec.reference).rpartition(":")
        if registry.manifest_digest(repository, tag) == result.digest:
            self.report(spec.name, f"{spec.reference} is in the registry already")
            return result
        self.report(spec.name, f"pushing {spec.reference} to {registry.address}")
        source = f"oci:{self.layout}:{result.tag}"
        with self._locked():
            if result.tag not in self._tags():
                raise ImageBuildError(
                    spec.name, f"{result.tag} left the cache (pruned by newer builds): rebuild"
                )
            self._run(
                spec.name,
                [
                    "skopeo",
                    "copy",
                    "--quiet",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                    source,
                    f"docker://{registry.address}/{repository}:{tag}",
                ],
            )
        return dataclasses.replace(result, pushed=True)

    def build_and_push(self, names: list[str], registry: RegistryLike) -> list[ImageResult]:
        """Each image of ``names``, built (or found) then pushed (unless there already)."""
        unknown = [n for n in names if n not in IMAGES]
        if unknown:
            raise ImageBuildError(", ".join(unknown), f"unknown image; known: {', '.join(IMAGES)}")
        return [self.push(self.build(IMAGES[n]), registry) for n in names]

    # ------------------------------------------------------------------ steps

    def _ensure_base(self, name: str) -> str:
        tag = f"base-{self.base_key()}"
        if tag in self._tags():
            return tag
        work = self._work(tag)
        rootfs = work / "rootfs.tar"
        self.report(name, f"base: Debian {DEBIAN_SUITE} with {', '.join(BASE_PACKAGES)}")
        self._run(
            name,
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                *(f"--dpkgopt=path-exclude={p}" for p in _EXCLUDES),
                "--format=tar",
                DEBIAN_SUITE,
                str(rootfs),
            ],
        )
        self.report(name, "base: packing its layer")
        self._umoci(name, "new", "--image", f"{self.layout}:{tag}")
        self._umoci(name, "raw", "add-layer", "--image", f"{self.layout}:{tag}", str(rootfs))
        shutil.rmtree(work, ignore_errors=True)
        return tag

    def _ensure_dependencies(self, spec: ImageSpec, base: str) -> str:
        """The dependencies layer on ``base``: ``uv sync --no-install-project`` from the lock."""
        tag = f"deps-{spec.name}-{self.dependencies_key(spec)}"
        if tag in self._tags():
            return tag
        root = self._unpack(spec.name, base, tag)
        app = root / APP_DIR.lstrip("/")
        app.mkdir(parents=True, exist_ok=True)
        for name in ("pyproject.toml", "uv.lock"):
            shutil.copy2(_required(spec, name), app / name)
        uv = _uv()
        assert uv is not None  # missing_tools() said so otherwise
        shutil.copy2(uv, root / "usr" / "local" / "bin" / "uv")
        flags = [*spec.sync_flags, "--no-install-project"]
        self.report(spec.name, f"dependencies: uv sync {' '.join(flags)} (in the image's root)")
        self._in_root(spec.name, root, ["uv", "sync", *flags, "--directory", APP_DIR])
        self.report(spec.name, "dependencies: packing their layer")
        self._pack(spec, root, tag)
        return tag

    def _build_project(self, spec: ImageSpec, dependencies: str, tag: str) -> None:
        """The project layer on ``dependencies``: its sources, and ``uv sync`` installing it.
        A project of no sources (a plain environment: ``vllm-cpu``) has none: the image is its
        dependencies, tagged."""
        if not spec.sources:
            self._umoci(spec.name, "tag", "--image", f"{self.layout}:{dependencies}", tag)
            records = self.cache / "records"
            shutil.copy2(records / f"{dependencies}.json", records / f"{tag}.json")
            return
        root = self._unpack(spec.name, dependencies, tag)
        app = root / APP_DIR.lstrip("/")
        for path in _project_files(spec):
            target = app / path.relative_to(spec.project_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        self.report(
            spec.name, f"project: uv sync {' '.join(spec.sync_flags)} (in the image's root)"
        )
        self._in_root(spec.name, root, ["uv", "sync", *spec.sync_flags, "--directory", APP_DIR])
        self.report(spec.name, "project: packing its layer")
        self._pack(spec, root, tag)

    def _pack(self, spec: ImageSpec, root: Path, tag: str) -> None:
        """``root``'s changes as a new layer of ``tag``, with the image's configuration and a
        record of what it installs (read inside it by its own interpreter: a smoke test)."""
        listed = self._in_root(spec.name, root, ["python3", "-c", _LIST_DISTRIBUTIONS])
        distributions = dict(json.loads(listed.strip().splitlines()[-1]))
        self._umoci(spec.name, "repack", "--image", f"{self.layout}:{tag}", str(root.parent))
        self._umoci(
            spec.name,
            "config",
            "--image",
            f"{self.layout}:{tag}",
            f"--config.env=PATH={IMAGE_PATH}",
            f"--config.workingdir={APP_DIR}",
            "--config.cmd=python3",
        )
        records = self.cache / "records"
        records.mkdir(parents=True, exist_ok=True)
        record = {"reference": spec.reference, "builder": BUILDER_VERSION}
        (records / f"{tag}.json").write_text(
            json.dumps(record | {"distributions": distributions}, indent=1)
        )
        shutil.rmtree(root.parent.parent, ignore_errors=True)

    def _unpack(self, name: str, image: str, tag: str) -> Path:
        """``image`` unpacked into a fresh work directory for ``tag``; its root file system."""
        bundle = self._work(tag) / "bundle"
        self.report(name, f"unpacking {image.rsplit('-', 1)[0]}")
        self._umoci(name, "unpack", "--image", f"{self.layout}:{image}", str(bundle))
        return bundle / "rootfs"

    def _in_root(self, name: str, root: Path, argv: list[str]) -> str:
        """Run ``argv`` chrooted in ``root``: /proc, /dev, resolv.conf and the uv cache bound
        in a private mount namespace (gone with the command, whatever happens)."""
        cache = Path(os.environ.get("UV_CACHE_DIR") or Path.home() / ".cache" / "uv")
        cache.mkdir(parents=True, exist_ok=True)
        (root / _UV_CACHE_IN_ROOT.lstrip("/")).mkdir(exist_ok=True)
        resolv = root / "etc" / "resolv.conf"
        made_resolv = not resolv.exists() and not resolv.is_symlink()
        if made_resolv:
            resolv.touch()
        # This machine's CA bundle, for the index (a proxy's CA may sign it); only while it runs.
        ca = root / _HOST_CA.lstrip("/")
        ca.touch()
        mounts = [
            f"mount --bind {shlex.quote(_host_ca())} {shlex.quote(str(ca))}",
            f"mount -t proc proc {shlex.quote(str(root / 'proc'))}",
            f"mount --rbind /dev {shlex.quote(str(root / 'dev'))}",
            f"mount --bind /etc/resolv.conf {shlex.quote(str(resolv))}",
            f"mount --bind {shlex.quote(str(cache))} "
            f"{shlex.quote(str(root / _UV_CACHE_IN_ROOT.lstrip('/')))}",
        ]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in _UV_ENV.items())
        script = " && ".join(
            [
                *mounts,
                f"exec chroot {shlex.quote(str(root))} /usr/bin/env -i {env} {shlex.join(argv)}",
            ]
        )
        try:
            return self._run(
                name, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
            )
        finally:
            (root / _UV_CACHE_IN_ROOT.lstrip("/")).rmdir()
            ca.unlink(missing_ok=True)
            if made_resolv:
                resolv.unlink(missing_ok=True)

    # ------------------------------------------------------------------ layout

    def _tags(self) -> set[str]:
        index = self.layout / "index.json"
        if not index.exists():
            return set()
        manifests = json.loads(index.read_text()).get("manifests", [])
        return {
            m["annotations"]["org.opencontainers.image.ref.name"]
            for m in manifests
            if "org.opencontainers.image.ref.name" in m.get("annotations", {})
        }

    def _manifest(self, tag: str) -> tuple[str, int]:
        """The digest of ``tag``'s manifest and its layers' compressed size."""
        for m in json.loads((self.layout / "index.json").read_text())["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                digest = m["digest"]
                blob = self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]
                layers = json.loads(blob.read_text())["layers"]
                return digest, sum(layer["size"] for layer in layers)
        raise ImageBuildError(tag, f"no tag {tag} in {self.layout}")

    def _prune(self, name: str, *, keep: str) -> None:
        """Drop all but the newest :data:`_KEEP` tags of ``name`` (other checkouts sharing the
        cache may push one of the others), the dependencies none of those is built on and
        older bases, then their unreferenced blobs (a layer shared by tags kept stays)."""
        base = f"base-{self.base_key()}"
        records = self.cache / "records"
        mine = [t for t in self._tags() if t.startswith(f"{name}-") and t != keep]
        mine.sort(key=lambda t: _mtime(records / f"{t}.json"), reverse=True)
        # An older builder's tags are never asked for again (its version is in every key).
        older = [t for t in mine if _builder(records / f"{t}.json") != BUILDER_VERSION]
        mine = [t for t in mine if t not in older]
        stale = mine[_KEEP - 1 :] + older
        stale += [t for t in self._tags() if t.startswith("base-") and t != base]
        # The newest dependencies stay (the next source change builds on them), older ones go.
        current = f"deps-{name}-{self.dependencies_key(IMAGES[name])}"
        stale += [t for t in self._tags() if t.startswith(f"deps-{name}-") and t != current]
        for tag in stale:
            self._umoci(name, "rm", "--image", f"{self.layout}:{tag}")
            (records / f"{tag}.json").unlink(missing_ok=True)
        if stale:
            self._umoci(name, "gc", "--layout", str(self.layout))

    def _umoci(self, name: str, *args: str) -> str:
        if not (self.layout / "index.json").exists():
            self.layout.parent.mkdir(parents=True, exist_ok=True)
            self._run(name, ["umoci", "init", "--layout", str(self.layout)])
        return self._run(name, ["umoci", *args])

    def _work(self, tag: str) -> Path:
        """A fresh work directory; those left by a killed or failed build go (the cache's lock
        is held: no other build uses them)."""
        shutil.rmtree(self.cache / "work", ignore_errors=True)
        work = self.cache / "work" / tag
        work.mkdir(parents=True)
        return work

    def _locked(self) -> _Lock:
        return _Lock(
            self.cache / ".lock", lambda: self.report("images", "waiting for another build")
        )

    def _run(self, name: str, argv: list[str]) -> str:
        log = self.cache / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write(f"$ {shlex.join(argv)}\n")
            out.flush()
            res = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "PATH": _path()},
            )
            out.write(res.stdout + res.stderr)
        if res.returncode != 0:
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
            raise ImageBuildError(
                name, f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed (log: {log}):\n{tail}"
            )
        return res.stdout


class _Lock:
    """The cache's lock (one build or push at a time on the layout), waiting when held."""

    def __init__(self, path: Path, on_wait: Callable[[], None]) -> None:
        self.path, self.on_wait = path, on_wait

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.on_wait()
            fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def _required(spec: ImageSpec, name: str) -> Path:
    path = spec.project_dir / name
    if not path.is_file():
        raise ImageBuildError(spec.name, f"{path} is missing")
    return path


def _uv_reads(spec: ImageSpec) -> str:
    """The tables of ``spec``'s ``pyproject.toml`` that ``uv sync`` reads, as JSON."""
    with _required(spec, "pyproject.toml").open("rb") as f:
        data = tomllib.load(f)
    reads = {k: data[k] for k in _UV_READS if k in data}
    reads["tool.uv"] = data.get("tool", {}).get("uv", {})
    return json.dumps(reads, sort_keys=True)


def _project_files(spec: ImageSpec) -> Iterator[Path]:
    """``pyproject.toml``, ``uv.lock`` and the sources of ``spec``, sorted (no caches)."""
    root = spec.project_dir
    for name in ("pyproject.toml", "uv.lock"):
        yield _required(spec, name)
    for source in spec.sources:
        path = root / source
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
        else:
            raise ImageBuildError(spec.name, f"{path}: a source of the image is missing")


def _digest(parts: list[str | bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def _path() -> str:
    extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
    return os.pathsep.join([os.environ.get("PATH", ""), *extra])


def _builder(record: Path) -> str | None:
    """The builder version a tag's record names (None: unreadable, or older than the field)."""
    try:
        return json.loads(record.read_text()).get("builder")
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _host_ca() -> str:
    """This machine's CA bundle (what its own uv trusts)."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ImageBuildError("images", "no CA bundle (SSL_CERT_FILE, or Debian's ca-certificates)")


def _uv() -> Path | None:
    found = shutil.which("uv") or shutil.which("uv", path=str(Path.home() / ".local" / "bin"))
    return Path(found) if found else None


def _uv_version() -> str:
    uv = _uv()
    if uv is None:
        return ""
    return subprocess.run([str(uv), "--version"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    builder = ImageBuilder(progress=lambda n, m: print(f"{n}: {m}", flush=True))
    for name in sys.argv[1:] or list(IMAGES):
        result = builder.build(IMAGES[name])
        print(
            f"{result.reference}: {'built' if result.built else 'cached'} in "
            f"{result.seconds:.0f} s, {result.size / 2**20:.0f} MiB, {result.digest}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
