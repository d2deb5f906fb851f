"""The weights store: every version of a model's weights, addressed by the digest of its files.

One resource, two configurations (the behaviour is the same, only the filesystem differs):
a local directory under the state directory on the twin (``<state>/weights``), an
S3-compatible bucket on the homelab (``s3://ml-models`` on Forge's MinIO, through fsspec
and s3fs; credentials from the standard ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``).

Layout below ``url``::

    <model>/versions/<digest>/...     the files (config.json, model.safetensors, tokenizer)
    <model>/versions/<digest>.json    the version's metadata, written last: a version is
                                      listed once its files are stored and verified
    <model>/current.json              the current version and the history of changes

``digest`` is the tree digest of :mod:`homelab_dagster.ml.digest`: sha256 over the sorted
``<relative path> NUL <file sha256> LF`` lines. Registering the same files twice is a no-op;
rolling back sets ``current`` to an older version, nothing is deleted.

**Nothing half-written, nothing corrupt served.** A version's files are copied into
``<model>/staging/<digest>.<random>/``, verified, then renamed into place, and its metadata is
written last: an interrupted copy leaves at most a staging directory, never a listed version.
:meth:`WeightsStore.current` and :meth:`WeightsStore.set_current` re-hash the version and
refuse one whose files no longer match its digest (naming them); registering the same weights
again repairs such a copy from the source.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field

from homelab_dagster.errors import WeightsError
from homelab_dagster.ml.digest import file_sha256, tree_digest
from homelab_dagster.weights import WeightsVersion

# WeightsVersion is the core's model (homelab_dagster.weights), re-exported here.
__all__ = ["WeightsStore", "WeightsVersion"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class WeightsStore(dg.ConfigurableResource):
    """Versions of model weights in a directory or an S3-compatible bucket."""

    url: str = Field(description="A directory, file:// URL or s3://bucket[/prefix].")
    endpoint_url: str | None = Field(
        default=None, description="The S3-compatible endpoint (MinIO) for s3:// URLs."
    )

    def _fs(self, url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
        url = url or self.url
        if "://" not in url or url.startswith("file://"):
            local = LocalFileSystem(auto_mkdir=True)
            return local, local._strip_protocol(url).rstrip("/")
        options: dict[str, Any] = {}
        if self.endpoint_url and url.startswith("s3://"):
            options["client_kwargs"] = {"endpoint_url": self.endpoint_url}
        fs, path = url_to_fs(url, **options)
        return fs, path.rstrip("/")

    def _uri(self, fs: fsspec.AbstractFileSystem, path: str) -> str:
        return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)

    @staticmethod
    def _hash_tree(
        fs: fsspec.AbstractFileSystem, root: str
    ) -> tuple[str, dict[str, str], int, list[str]]:
        """(digest, files, size, absolute paths) of the files below ``root`` on ``fs``."""
        paths = sorted(fs.find(root))
        files: dict[str, str] = {}
        size = 0
        for path in paths:
            relative = path[len(root) :].lstrip("/")
            with fs.open(path, "rb") as stream:
                files[relative] = file_sha256(stream)
            size += int(fs.size(path))
        return tree_digest(files.items()), files, size, paths

    def digest_of(self, uri: str) -> str:
        """The digest of the files below ``uri`` (a directory on any filesystem the store reads)."""
        fs, root = self._fs(uri)
        try:
            digest, files, _, _ = self._hash_tree(fs, root)
        except OSError as exc:
            raise WeightsError(f"cannot read the weights at {uri}: {exc}") from exc
        if not files:
            raise WeightsError(f"no files below {uri}")
        return digest

    def register(
        self, model: str, source_uri: str, expected_digest: str | None = None, **info: Any
    ) -> tuple[WeightsVersion, bool]:
        """Store the weights below ``source_uri`` as a version of ``model``.

        ``info`` fills :class:`WeightsVersion`'s optional fields (source_run, metrics, ...).
        Returns the version and whether it is new (False: the same files were registered
        before, and nothing was copied).

        Raises:
            WeightsError: the source is empty or unreadable, its digest is not
                ``expected_digest``, or the stored copy does not verify.
        """
        src_fs, src_root = self._fs(source_uri)
        fs, root = self._fs()
        try:
            digest, files, size, paths = self._hash_tree(src_fs, src_root)
            if not files:
                raise WeightsError(f"no files below {source_uri} to register")
            if expected_digest and digest != expected_digest:
                raise WeightsError(
                    f"the weights at {source_uri} have digest {digest}, not the {expected_digest} "
                    "their training run reported"
                )
            meta_path = f"{root}/{model}/versions/{digest}.json"
            dest = f"{root}/{model}/versions/{digest}"
            if fs.exists(meta_path):
                existing = self.get(model, digest)
                if not self._mismatches(existing):
                    return existing, False
                self._copy(src_fs, paths, files, fs, f"{root}/{model}", digest)  # repair it
                return existing, False
            self._copy(src_fs, paths, files, fs, f"{root}/{model}", digest)
            version = WeightsVersion(
                model=model,
                digest=digest,
                uri=self._uri(fs, dest),
                size_bytes=size,
                files=files,
                created_at=_now(),
                **info,
            )
            fs.pipe(meta_path, version.model_dump_json(indent=2).encode())
        except OSError as exc:
            raise WeightsError(f"cannot register {source_uri} as {model}: {exc}") from exc
        return version, True

    def _copy(
        self,
        src_fs: fsspec.AbstractFileSystem,
        paths: list[str],
        files: dict[str, str],
        fs: fsspec.AbstractFileSystem,
        model_root: str,
        digest: str,
    ) -> None:
        """Copy ``paths`` into a staging directory, verify the copy, then rename it to
        ``<model_root>/versions/<digest>`` (replacing what was there); the staging directory
        is removed if anything fails."""
        staging = f"{model_root}/staging/{digest}.{secrets.token_hex(4)}"
        dest = f"{model_root}/versions/{digest}"
        try:
            for path, relative in zip(paths, files, strict=True):
                with (
                    src_fs.open(path, "rb") as reader,
                    fs.open(f"{staging}/{relative}", "wb") as writer,
                ):
                    while chunk := reader.read(1 << 20):
                        writer.write(chunk)
            stored, _, _, _ = self._hash_tree(fs, staging)
            if stored != digest:
                raise WeightsError(
                    f"the copy at {self._uri(fs, staging)} does not verify ({stored})"
                )
            if fs.exists(dest):
                fs.rm(dest, recursive=True)
            fs.makedirs(f"{model_root}/versions", exist_ok=True)
            fs.mv(staging, dest, recursive=True)  # a rename on a local store
        except BaseException:
            with contextlib.suppress(OSError):
                if fs.exists(staging):
                    fs.rm(staging, recursive=True)
            raise

    def _mismatches(self, version: WeightsVersion) -> list[str]:
        """The files of ``version`` whose stored copy is missing, extra or changed."""
        fs, root = self._fs()
        base = f"{root}/{version.model}/versions/{version.digest}"
        try:
            _, stored, _, _ = self._hash_tree(fs, base) if fs.exists(base) else ("", {}, 0, [])
        except OSError as exc:
            raise WeightsError(f"cannot read {self._uri(fs, base)}: {exc}") from exc
        names = sorted(set(stored) | set(version.files))
        return [n for n in names if stored.get(n) != version.files.get(n)]

    def _refuse_if_corrupt(self, version: WeightsVersion) -> None:
        bad = self._mismatches(version)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise WeightsError(
                f"version {version.digest[:12]} of {version.model} at {version.uri} no longer "
                f"matches its digest ({shown} missing or changed): it is not served. Register "
                "the same weights again (materialise the model's weights asset: the copy is "
                "repaired from the training run's output) or roll back to an earlier version"
            )

    def versions(self, model: str) -> list[WeightsVersion]:
        """Every registered version of ``model``, oldest first."""
        fs, root = self._fs()
        try:
            paths = fs.glob(f"{root}/{model}/versions/*.json")
            found = [WeightsVersion.model_validate_json(fs.cat(p)) for p in paths]
        except OSError as exc:
            raise WeightsError(f"cannot list the versions of {model}: {exc}") from exc
        return sorted(found, key=lambda v: (v.created_at, v.digest))

    def get(self, model: str, digest: str) -> WeightsVersion:
        """The version of ``model`` with ``digest`` (or a unique prefix of at least 8 characters).

        Raises:
            WeightsError: no version, or several, match.
        """
        if len(digest) < 8:
            raise WeightsError(f"digest {digest!r} is too short (at least 8 characters)")
        matches = [v for v in self.versions(model) if v.digest.startswith(digest)]
        if len(matches) != 1:
            known = ", ".join(v.digest[:12] for v in self.versions(model)) or "none"
            what = "no version" if not matches else "several versions"
            raise WeightsError(f"{what} of {model} match {digest!r} (registered: {known})")
        return matches[0]

    def find(self, model: str, fingerprint: str) -> WeightsVersion | None:
        """The newest version of ``model`` trained from inputs with ``fingerprint``, if any."""
        matches = [v for v in self.versions(model) if v.fingerprint == fingerprint]
        return matches[-1] if matches else None

    def _read_current(self, model: str) -> dict[str, Any] | None:
        fs, root = self._fs()
        path = f"{root}/{model}/current.json"
        try:
            return json.loads(fs.cat(path)) if fs.exists(path) else None
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot read the current version of {model}: {exc}") from exc

    def current(self, model: str) -> WeightsVersion | None:
        """The version of ``model`` that is served, or None before the first is promoted.

        Raises:
            WeightsError: its stored files no longer match its digest (never served).
        """
        version = self._current_unverified(model)
        if version is not None:
            self._refuse_if_corrupt(version)
        return version

    def _current_unverified(self, model: str) -> WeightsVersion | None:
        state = self._read_current(model)
        return self.get(model, state["digest"]) if state else None

    def history(self, model: str) -> list[dict[str, str]]:
        """Every change of ``model``'s current version, oldest first (digest, set_at, reason)."""
        state = self._read_current(model)
        return list(state["history"]) if state else []

    def set_current(self, model: str, digest: str, reason: str) -> WeightsVersion:
        """Make the registered version ``digest`` current; ``reason`` goes into the history.

        Raises:
            WeightsError: unknown, or its stored files no longer match its digest.
        """
        version = self.get(model, digest)
        self._refuse_if_corrupt(version)
        history = self.history(model)
        history.append({"digest": version.digest, "set_at": _now(), "reason": reason})
        fs, root = self._fs()
        state = {"digest": version.digest, "history": history}
        try:
            fs.pipe(f"{root}/{model}/current.json", json.dumps(state, indent=2).encode())
        except OSError as exc:
            raise WeightsError(f"cannot set the current version of {model}: {exc}") from exc
        return version

    def rollback(self, model: str, digest: str | None = None) -> WeightsVersion:
        """Make an older version current: ``digest``, or the one current before this one.

        Raises:
            WeightsError: there is no earlier version to go back to, or ``digest`` is unknown.
        """
        current = self._current_unverified(model)  # a corrupt current one can be left
        if digest is None:
            earlier = [
                h["digest"]
                for h in self.history(model)
                if current is None or h["digest"] != current.digest
            ]
            if not earlier:
                raise WeightsError(f"{model} has no earlier version to roll back to")
            digest = earlier[-1]
        target = self.get(model, digest)
        was = current.digest[:12] if current else "none"
        return self.set_current(model, target.digest, f"rollback from {was}")

    def verify(self, model: str, digest: str) -> bool:
        """Whether the stored files of version ``digest`` still hash to it."""
        return not self._mismatches(self.get(model, digest))
