"""The weights store against the twin's real S3 server (versitygw): content addressing,
checksums, metadata, listing, current version, rollback, and the copy step of the serving
pods; and the two deployments' configurations of it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from homelab_dagster.errors import WeightsError
from homelab_dagster.ml.digest import directory_digest
from resources.weights import WeightsStore, version_prefix
from resources.weights_copy import copy_version

pytestmark = pytest.mark.twin


def weights_dir(path: Path, payload: bytes) -> Path:
    """A stand-in for exported weights (the store never parses them)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (path / "model.safetensors").write_bytes(payload)
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.json").write_text("{}")
    return path


def keys(store: WeightsStore, prefix: str) -> set[str]:
    return {o.key for o in store.store.objects(prefix)}


def test_a_version_is_addressed_by_the_digest_of_its_files(
    tmp_path: Path, weights_store: WeightsStore
) -> None:
    source = weights_dir(tmp_path / "w1", b"\x01" * 100)
    digest, files, size = directory_digest(source)
    version, new = weights_store.register(
        "m", str(source), expected_digest=digest, metrics={"eval_loss": 2.0}
    )
    assert new and version.digest == digest and version.size_bytes == size
    assert version.uri == f"s3://{weights_store.bucket}/m/versions/{digest}"
    assert version.files == files
    assert keys(weights_store, "m/") == {
        f"m/versions/{digest}/config.json",
        f"m/versions/{digest}/model.safetensors",
        f"m/versions/{digest}/tokenizer/vocab.json",
        f"m/versions/{digest}.json",
    }
    meta, _ = weights_store.store.read_json(f"m/versions/{digest}.json")
    assert meta["digest"] == digest and meta["metrics"] == {"eval_loss": 2.0} and meta["created_at"]
    # What the server keeps for each object is the checksum computed here.
    for name, checksum in version.checksums.items():
        assert weights_store.store.checksum(f"m/versions/{digest}/{name}") == checksum
    assert weights_store.verify("m", digest) and weights_store.verify("m", digest, deep=True)
    # Registering the same bytes again (from anywhere) is a no-op.
    again, new = weights_store.register("m", str(weights_dir(tmp_path / "copy", b"\x01" * 100)))
    assert not new and again == version


def test_a_file_larger_than_a_part_is_stored_in_parts_and_verifies(
    tmp_path: Path, object_store
) -> None:
    store = WeightsStore(
        bucket="test-parts",
        endpoint_url=f"http://{object_store.address}",
        credentials_file=str(object_store.credentials),
        part_size_mb=5,
    )
    source = weights_dir(tmp_path / "big", bytes(range(256)) * (12 * 4096))  # 12 MiB: 3 parts
    version, _ = store.register("m", str(source))
    assert version.checksums["model.safetensors"].endswith("-3")
    assert store.verify("m", version.digest, deep=True)
    copied = tmp_path / "copied"
    assert copy_version(store.store, version_prefix("m", version.digest), copied)[0] == 3
    assert directory_digest(copied)[0] == version.digest


def test_a_digest_that_does_not_match_is_refused(
    tmp_path: Path, weights_store: WeightsStore
) -> None:
    source = weights_dir(tmp_path / "w", b"data")
    with pytest.raises(WeightsError, match="not the"):
        weights_store.register("m", str(source), expected_digest="0" * 64)
    assert weights_store.versions("m") == []
    with pytest.raises(WeightsError, match="no weights directory"):
        weights_store.register("m", str(tmp_path / "missing"))


def test_training_output_is_staged_then_registered_in_place(
    tmp_path: Path, weights_store: WeightsStore
) -> None:
    """What a training run does (stage: stored and verified, not listed), then what
    model_weights does (register from the store's own URI: nothing is uploaded again)."""
    source = weights_dir(tmp_path / "w", b"trained")
    staged = weights_store.stage("m", str(source))
    assert weights_store.versions("m") == []  # not listed before its metadata
    version, new = weights_store.register("m", staged.uri, expected_digest=staged.digest)
    assert new and version.uri == staged.uri
    assert weights_store.stage("m", staged.uri).reused == 3  # every file already there


def test_versions_current_and_rollback(tmp_path: Path, weights_store: WeightsStore) -> None:
    store = weights_store
    first, _ = store.register("m", str(weights_dir(tmp_path / "a", b"a")), fingerprint="fa")
    second, _ = store.register("m", str(weights_dir(tmp_path / "b", b"b")), fingerprint="fb")
    assert [v.digest for v in store.versions("m")] in (
        [first.digest, second.digest],
        [second.digest, first.digest],  # created in the same second: ordered by digest
    )
    assert store.current("m") is None
    store.set_current("m", first.digest, "trained")
    store.set_current("m", second.digest, "trained")
    assert store.rollback("m").digest == first.digest  # to the previous current
    assert store.current("m").digest == first.digest
    assert store.rollback("m", second.digest[:10]).digest == second.digest  # by prefix
    assert [h["reason"] for h in store.history("m")][-2:] == [
        f"rollback from {second.digest[:12]}",
        f"rollback from {first.digest[:12]}",
    ]
    assert store.find("m", "fb") == second and store.find("m", "nope") is None
    with pytest.raises(WeightsError, match="no version"):
        store.rollback("m", "f" * 12)


def test_racing_writers_of_the_current_version_all_land_in_its_history(
    tmp_path: Path, weights_store: WeightsStore
) -> None:
    """current.json is replaced only as it was read (If-Match): eight writers at once, eight
    entries."""
    version, _ = weights_store.register("m", str(weights_dir(tmp_path / "a", b"a")))
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            weights_store.set_current("m", version.digest, f"writer {i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reasons = sorted(h["reason"] for h in weights_store.history("m"))
    assert reasons == sorted(f"writer {i}" for i in range(8))


def test_the_copy_step_verifies_every_file_and_names_a_changed_one(
    tmp_path: Path, weights_store: WeightsStore, object_store
) -> None:
    version, _ = weights_store.register("m", str(weights_dir(tmp_path / "a", b"good")))
    prefix = version_prefix("m", version.digest)
    files, _ = copy_version(weights_store.store, prefix, tmp_path / "ok")
    assert files == 3 and directory_digest(tmp_path / "ok")[0] == version.digest
    # Behind the server's back (its data directory): its checksums still say the old bytes.
    on_disk = object_store.data / weights_store.bucket / prefix / "model.safetensors"
    on_disk.write_bytes(b"evil")
    assert weights_store.mismatches(version) == []  # the checksums cannot see it
    assert weights_store.mismatches(version, deep=True) == ["model.safetensors"]
    with pytest.raises(WeightsError, match=r"model\.safetensors of version .* changed; not served"):
        copy_version(weights_store.store, prefix, tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []  # nothing left for a server to load
    with pytest.raises(WeightsError, match="not a registered version"):
        copy_version(weights_store.store, version_prefix("m", "0" * 64), tmp_path / "none")


def test_the_store_errors_name_the_bucket_and_never_a_key(tmp_path: Path, object_store) -> None:
    bad_keys = tmp_path / "credentials"
    bad_keys.write_text("[default]\naws_access_key_id = NOPE\naws_secret_access_key = canary42\n")
    store = WeightsStore(
        bucket="test-refused",
        endpoint_url=f"http://{object_store.address}",
        credentials_file=str(bad_keys),
    )
    with pytest.raises(WeightsError) as refused:
        store.versions("m")
    assert "s3://test-refused" in str(refused.value) and "refused the credentials" in str(
        refused.value
    )
    assert "canary42" not in str(refused.value)
    with pytest.raises(WeightsError, match="holds no aws_access_key_id"):
        WeightsStore(bucket="x-y-z", credentials_file=str(tmp_path / "missing")).versions("m")
    down = WeightsStore(
        bucket="test-down", endpoint_url="http://127.0.0.1:9", credentials_file=str(bad_keys)
    )
    with pytest.raises(WeightsError, match="does not answer"):
        down.versions("m")
