"""The weights store: content addressing, metadata, listing, current version and rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from homelab_dagster.errors import WeightsError
from homelab_dagster.ml.digest import directory_digest
from resources.weights import WeightsStore


def weights_dir(path: Path, payload: bytes) -> Path:
    """A stand-in for exported weights (the store never parses them)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (path / "model.safetensors").write_bytes(payload)
    return path


@pytest.fixture
def store(tmp_path: Path) -> WeightsStore:
    return WeightsStore(url=str(tmp_path / "store"))


def test_a_version_is_addressed_by_the_digest_of_its_files(
    tmp_path: Path, store: WeightsStore
) -> None:
    source = weights_dir(tmp_path / "w1", b"\x01" * 100)
    digest = directory_digest(source)[0]
    version, new = store.register(
        "m", str(source), expected_digest=digest, metrics={"eval_loss": 2.0}
    )
    assert new and version.digest == digest and version.size_bytes == directory_digest(source)[2]
    stored = Path(version.uri)
    assert stored == tmp_path / "store" / "m" / "versions" / digest
    assert directory_digest(stored)[0] == digest
    meta = json.loads((tmp_path / "store" / "m" / "versions" / f"{digest}.json").read_text())
    assert meta["digest"] == digest and meta["metrics"] == {"eval_loss": 2.0} and meta["created_at"]
    assert store.verify("m", digest)
    # Registering the same bytes again (from anywhere) is a no-op.
    again, new = store.register("m", str(weights_dir(tmp_path / "copy", b"\x01" * 100)))
    assert not new and again == version


def test_a_digest_that_does_not_match_is_refused(tmp_path: Path, store: WeightsStore) -> None:
    source = weights_dir(tmp_path / "w", b"data")
    with pytest.raises(WeightsError, match="not the"):
        store.register("m", str(source), expected_digest="0" * 64)
    assert store.versions("m") == []
    with pytest.raises(WeightsError, match="no files"):
        store.register("m", str(tmp_path / "missing"))


def test_versions_current_and_rollback(tmp_path: Path, store: WeightsStore) -> None:
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


def test_tampered_files_no_longer_verify(tmp_path: Path, store: WeightsStore) -> None:
    version, _ = store.register("m", str(weights_dir(tmp_path / "a", b"a")))
    (Path(version.uri) / "model.safetensors").write_bytes(b"changed")
    assert not store.verify("m", version.digest)


def test_the_homelab_configuration_is_an_s3_bucket_through_fsspec() -> None:
    import s3fs

    store = WeightsStore(url="s3://ml-models", endpoint_url="http://minio.data-ml:9000")
    fs, root = store._fs()
    assert isinstance(fs, s3fs.S3FileSystem) and root == "ml-models"
    assert fs.client_kwargs == {"endpoint_url": "http://minio.data-ml:9000"}
