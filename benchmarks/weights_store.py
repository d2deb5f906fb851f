"""The weights store against a plain S3 client, side by side in one run, on the twin's S3
server (versitygw, from the toolchain, on a port and directory of its own).

- **register**: ``WeightsStore.register`` of a 100 MB weights tree (hash every file, upload
  each with its SHA-256, which the server checks, read the stored checksums back, write the
  metadata) against boto3's managed upload (``upload_file``, s3transfer: what another client's
  plain copy does) of the same files to another prefix;
- **copy out**: the serving pod's copy step (``resources.weights_copy.copy_version``: every
  byte hashed, the tree's digest checked) against boto3's ``download_file`` of the same
  objects.

Alternating, ``--repeat`` times (a fresh model name each time, so nothing is reused); the
median of each and their ratio. Target: each ratio at most 1.5.

    uv run python benchmarks/weights_store.py [--mb 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import save

from homelab_dagster.twin_store import ObjectStore
from infra.toolchain import ensure_toolchain
from resources.weights import WeightsStore, version_prefix
from resources.weights_copy import copy_version


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tree(root: Path, mb: int) -> Path:
    """A weights-like tree: a config, a tokenizer and two shards, ``mb`` MB in all."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "gpt2"}')
    (root / "tokenizer.json").write_bytes(os.urandom(1 << 20))
    half = (mb << 20) // 2
    for i in range(2):
        (root / f"model-{i:05}-of-00002.safetensors").write_bytes(os.urandom(half))
    return root


def _plain_upload(store: WeightsStore, source: Path, prefix: str) -> None:
    client = store.store.client
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        client.upload_file(str(path), store.bucket, f"{prefix}/{path.relative_to(source)}")


def _plain_download(store: WeightsStore, prefix: str, dest: Path) -> None:
    client = store.store.client
    for o in store.store.objects(f"{prefix}/"):
        target = dest / o.key[len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(store.bucket, o.key, str(target))


def _timed(action: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = action(*args)
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    tools = ensure_toolchain(build=False)
    work = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    server = ObjectStore(work / "store", _free_port(), tools.versitygw)
    server.up(for_pods=False)
    try:
        store = WeightsStore(
            bucket="bench-weights",
            endpoint_url=f"http://{server.address}",
            credentials_file=str(server.credentials),
        )
        source = _tree(work / "source", args.mb)
        store.store.ensure()
        times: dict[str, list[float]] = {k: [] for k in ("register", "upload", "copy", "download")}
        for i in range(args.repeat):
            seconds, _ = _timed(_plain_upload, store, source, f"plain-{i}")
            times["upload"].append(seconds)
            seconds, (version, _) = _timed(store.register, f"bench-{i}", str(source))
            times["register"].append(seconds)
            prefix = version_prefix(f"bench-{i}", version.digest)
            out_copy, out_plain = work / f"copy-{i}", work / f"plain-out-{i}"
            times["download"].append(_timed(_plain_download, store, prefix, out_plain)[0])
            times["copy"].append(_timed(copy_version, store.store, prefix, out_copy)[0])
            shutil.rmtree(out_copy)
            shutil.rmtree(out_plain)
        median = {k: statistics.median(v) for k, v in times.items()}
        report = {
            "tree_mb": args.mb,
            "repeat": args.repeat,
            "median_s": {k: round(v, 3) for k, v in median.items()},
            "register_vs_plain_upload": round(median["register"] / median["upload"], 2),
            "copy_step_vs_plain_download": round(median["copy"] / median["download"], 2),
            "target": "each ratio <= 1.5",
            "server": "versitygw 1.8.0 on loopback",
        }
        save("weights_store", report)
        ratios = (report["register_vs_plain_upload"], report["copy_step_vs_plain_download"])
        return 0 if max(ratios) <= 1.5 else 1
    finally:
        server.stop(purge=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
