"""Faults in the weights store, against the twin's real S3 server (versitygw): a stored file
changed, the server killed during a registration, the registering process killed midway,
and two registrations of the same weights at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import free_port

from homelab_dagster.errors import WeightsError
from homelab_dagster.twin_host import read_pid
from homelab_dagster.twin_store import ObjectStore
from resources.weights import WeightsStore, version_prefix

pytestmark = [pytest.mark.faults, pytest.mark.twin]

MODEL = "fault-model"
ROOT = Path(__file__).resolve().parents[2]
PART_MB = 5


def weights(path: Path, seed: str, *, shards: int = 1, mib: int = 2) -> Path:
    """A weights directory: a small config and ``shards`` safetensors files of ``mib`` MiB."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    for i in range(shards):
        block = f"{seed}-{i}".encode()
        (path / f"model-{i:05}.safetensors").write_bytes(block * ((mib << 20) // len(block)))
    return path


@pytest.fixture
def private_store(tmp_path: Path, toolchain):
    """An object store of this test's own (it is killed), on a free port."""
    store = ObjectStore(tmp_path / "store", free_port(), toolchain.versitygw)
    store.up(for_pods=False)
    yield store
    store.stop(purge=True)


def store_of(server: ObjectStore, **options: object) -> WeightsStore:
    return WeightsStore(
        bucket="ml-models",
        endpoint_url=f"http://{server.address}",
        credentials_file=str(server.credentials),
        part_size_mb=PART_MB,
        **options,
    )


REGISTER = textwrap.dedent(
    """
    import sys
    from homelab_dagster.errors import WeightsError
    from resources.weights import WeightsStore

    endpoint, keys, source = sys.argv[1:4]
    store = WeightsStore(
        bucket="ml-models", endpoint_url=endpoint, credentials_file=keys, part_size_mb=5
    )
    try:
        version, new = store.register("fault-model", source)
    except WeightsError as exc:
        print(exc)
        sys.exit(3)
    print("new" if new else "found", version.digest)
    """
)


def register_in_a_process(server: ObjectStore, source: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            REGISTER,
            f"http://{server.address}",
            str(server.credentials),
            str(source),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )


def wait_for_objects(store: WeightsStore, prefix: str, timeout_s: float = 60) -> int:
    """Poll until an object exists below ``prefix``: the upload is midway."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = store.store.objects(prefix)
        except WeightsError:
            found = []
        if found:
            return len(found)
        time.sleep(0.01)
    raise AssertionError(f"no object appeared below {prefix}")


def test_a_version_whose_files_changed_is_reported_and_never_served(tmp_path, weights_store):
    """Injects: the current version's stored model file replaced through S3 (another writer
    with the keys). Asserts: `current()` and promotion refuse it with a WeightsError naming
    the file and the recovery; it stays listed, the history is intact; rolling back to an
    earlier version works; registering the same weights again repairs the copy, which is
    served again."""
    store = weights_store
    old, _ = store.register(MODEL, str(weights(tmp_path / "old", "old")))
    store.set_current(MODEL, old.digest, "first")
    source = weights(tmp_path / "new", "new")
    new, _ = store.register(MODEL, str(source))
    store.set_current(MODEL, new.digest, "second")

    key = f"{version_prefix(MODEL, new.digest)}/model-00000.safetensors"
    store.store.client.put_object(Bucket=store.bucket, Key=key, Body=b"changed")

    assert store.verify(MODEL, new.digest) is False
    for refused in (
        lambda: store.current(MODEL),
        lambda: store.set_current(MODEL, new.digest, "again"),
    ):
        with pytest.raises(WeightsError) as info:
            refused()
        message = str(info.value)
        assert f"version {new.digest[:12]} of {MODEL}" in message
        assert "model-00000.safetensors" in message and "it is not served" in message
        assert "Register the same weights again" in message
    assert {v.digest for v in store.versions(MODEL)} == {old.digest, new.digest}
    assert [h["reason"] for h in store.history(MODEL)] == ["first", "second"]

    assert store.rollback(MODEL).digest == old.digest
    assert store.current(MODEL) == old
    again, fresh = store.register(MODEL, str(source))
    assert (again.digest, fresh) == (new.digest, False)
    assert store.verify(MODEL, new.digest, deep=True)
    assert store.set_current(MODEL, new.digest, "repaired").digest == new.digest
    assert store.current(MODEL) == new


def test_the_store_killed_during_a_registration_lists_nothing_and_the_next_stores_it_whole(
    tmp_path, private_store
):
    """Injects: the object store's process killed (SIGKILL) while a registration uploads 6
    shards of 12 MiB (each in parts). Asserts: the registration fails with a WeightsError
    saying the store does not answer; once the store is back (`up` restarts it), no version
    is listed although some files were stored; the next registration reuses what was
    stored whole, aborts the unfinished multipart upload, and lists the version, which
    verifies byte for byte."""
    source = weights(tmp_path / "src", "w", shards=6, mib=12)
    store = store_of(private_store)
    store.store.ensure()
    registering = register_in_a_process(private_store, source)
    wait_for_objects(store, f"{MODEL}/versions/")
    os.kill(read_pid(private_store.root / "store.pid") or 0, signal.SIGKILL)
    out, _ = registering.communicate(timeout=120)
    assert registering.returncode == 3, out
    assert "the object store does not answer" in out, out

    assert "started" in private_store.up(for_pods=False)
    assert store.versions(MODEL) == []
    versions = f"{MODEL}/versions/"
    left = [o.key[len(versions) :] for o in store.store.objects(versions)]
    assert left and all("/" in name for name in left)  # files, and no version's metadata

    after = store_of(private_store, stale_upload_s=0)
    version, new = after.register(MODEL, str(source))
    assert new and after.verify(MODEL, version.digest, deep=True)
    assert [v.digest for v in after.versions(MODEL)] == [version.digest]
    unfinished = after.store.client.list_multipart_uploads(Bucket=after.bucket)
    assert not unfinished.get("Uploads")


def test_a_registration_killed_midway_is_finished_by_the_next_one_reusing_what_was_stored(
    tmp_path, private_store
):
    """Injects: the registering process killed (SIGKILL) midway through its uploads.
    Asserts: no version is listed; the next registration (the same weights) reports the
    files it found stored with the right checksum and only uploads the rest; the version is
    listed once and verifies."""
    source = weights(tmp_path / "src", "w", shards=6, mib=12)
    store = store_of(private_store)
    store.store.ensure()
    registering = register_in_a_process(private_store, source)
    wait_for_objects(store, f"{MODEL}/versions/")
    registering.kill()
    registering.wait(timeout=30)
    assert store.versions(MODEL) == []

    staged = store_of(private_store, stale_upload_s=0).stage(MODEL, str(source))
    assert 1 <= staged.reused < len(staged.files)
    version, new = store.register(MODEL, str(source), expected_digest=staged.digest)
    assert new and store.verify(MODEL, version.digest, deep=True)
    assert len(store.versions(MODEL)) == 1


def test_two_registrations_of_the_same_weights_at_once_leave_one_good_version(
    tmp_path, private_store
):
    """Injects: two processes registering the same weights at the same moment. Asserts:
    both succeed, exactly one of them created the version (If-None-Match on its metadata),
    the other found it; one version is listed, and it verifies byte for byte."""
    source = weights(tmp_path / "src", "w", shards=3, mib=6)
    store = store_of(private_store)
    store.store.ensure()
    racers = [register_in_a_process(private_store, source) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in racers]
    assert [p.returncode for p in racers] == [0, 0], outputs
    assert sorted(o.split()[0] for o in outputs) == ["found", "new"], outputs
    [version] = store.versions(MODEL)
    assert all(version.digest in o for o in outputs)
    assert store.verify(MODEL, version.digest, deep=True)
