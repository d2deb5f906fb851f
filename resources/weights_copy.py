"""The serving pod's copy step: one weights version from the store's bucket into the pod,
verified before the server starts.

Runs as the init container ``fetch-weights`` of every endpoint's pod, on both targets, in the
project's own image (``python -m resources.weights_copy``). It reads the version's metadata
(``<model>/versions/<digest>.json``: the files and their SHA-256), copies each object into
``/models/<digest>`` while hashing it, and then checks the whole tree's digest. A file missing,
extra or different fails the pod before vLLM reads a byte: the copy is deleted, and the message
(which names the file) is the container's last line, which Kubernetes makes its termination
message (``FallbackToLogsOnError``), where the endpoint's rollout reads it
(``homelab_dagster.serving``).

Credentials: ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` from the Secret
``<endpoint>-weights-store`` that the endpoint's stack manages. Nothing here imports Dagster.

    python -m resources.weights_copy --endpoint-url URL s3://bucket/<model>/versions/<digest> DEST

The training pods' init container ``fetch-corpus`` copies their corpus the same way
(``--what corpus``, ``_corpora/<digest>``: :mod:`resources.training_pods`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import BinaryIO

from homelab_dagster.errors import WeightsError
from homelab_dagster.ml.digest import tree_digest
from resources._s3 import Bucket, Readable, hash_stream

__all__ = ["copy_version", "main"]


def copy_version(bucket: Bucket, prefix: str, dest: Path) -> tuple[int, int]:
    """Copy version ``prefix`` (``<model>/versions/<digest>``) of ``bucket`` into ``dest``,
    verifying every file against the version's metadata and the tree against its digest.
    Returns (files, bytes).

    Raises:
        WeightsError: the version is not registered, a file is missing, extra or different
            (named), or the store does not answer. ``dest`` is left empty.
    """
    digest = prefix.rsplit("/", 1)[-1]
    got = bucket.read_json(f"{prefix}.json")
    if got is None:
        raise WeightsError(f"{bucket.uri(prefix)} is not a registered version (no metadata)")
    listed: dict[str, str] = got[0].get("files") or {}
    stored = {o.key[len(prefix) + 1 :]: o for o in bucket.objects(f"{prefix}/")}
    missing, extra = sorted(set(listed) - set(stored)), sorted(set(stored) - set(listed))
    if missing or extra:
        raise WeightsError(
            f"version {digest[:12]} at {bucket.uri(prefix)}: "
            + "; ".join(
                f"{what} {', '.join(names)}"
                for what, names in (("missing", missing), ("not in the version", extra))
                if names
            )
        )
    dest.mkdir(parents=True, exist_ok=True)
    size = 0
    try:
        for name in sorted(listed):
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with bucket.open(stored[name].key) as body, target.open("wb") as out:
                found = hash_stream(_Tee(body, out), bucket.part_size)
            if found.sha256 != listed[name]:
                raise WeightsError(
                    f"{name} of version {digest[:12]} has sha256 {found.sha256[:12]}, the "
                    f"version lists {listed[name][:12]}: the stored file was changed; not served"
                )
            size += found.size
        if tree_digest(listed.items()) != digest:
            raise WeightsError(f"the files of {bucket.uri(prefix)} do not make digest {digest}")
    except BaseException:
        for child in dest.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        raise
    return len(listed), size


class _Tee:
    """A stream that writes what is read from it to ``out``."""

    def __init__(self, source: Readable, out: BinaryIO) -> None:
        self.source, self.out = source, out

    def read(self, size: int = -1, /) -> bytes:
        data = self.source.read(size)
        self.out.write(data)
        return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resources.weights_copy")
    parser.add_argument("--endpoint-url", default=None, help="The S3 endpoint (MinIO, versitygw).")
    parser.add_argument("source", help="s3://bucket/<model>/versions/<digest>")
    parser.add_argument("dest", type=Path, help="Where the files go (the pod's /models/<digest>).")
    parser.add_argument(
        "--what", default="weights", help="What is copied, for its messages (weights, corpus)."
    )
    args = parser.parse_args(argv)
    name, _, prefix = args.source.removeprefix("s3://").partition("/")
    start = time.monotonic()
    try:
        files, size = copy_version(Bucket(name, args.endpoint_url), prefix.rstrip("/"), args.dest)
    except WeightsError as exc:
        # The pod's termination message (terminationMessagePolicy: FallbackToLogsOnError).
        print(f"{args.what} copy failed: {exc}", file=sys.stderr, flush=True)
        return 1
    seconds = time.monotonic() - start
    print(
        f"{args.what} copy: {files} files, {size / 2**20:.1f} MiB from {args.source} in "
        f"{seconds:.1f} s; every file and the tree digest verified",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
