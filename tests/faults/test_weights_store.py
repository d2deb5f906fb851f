"""Faults in the weights store (a local directory, as on the twin): a stored version whose
files changed, and a copy interrupted by the kernel (a file-size limit: the write fails, or
the process is killed by SIGXFSZ, mid-copy)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from homelab_dagster.errors import WeightsError
from resources.weights import WeightsStore

pytestmark = pytest.mark.faults

MODEL = "fault-model"
LIMIT = 1 << 20  # the file-size limit of the interrupted copy: inside model.safetensors


def weights(path: Path, seed: str) -> Path:
    """A weights directory: a small config and a 2 MiB safetensors file."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    (path / "model.safetensors").write_bytes(seed.encode() * (2 * LIMIT // len(seed)))
    return path


def test_a_version_whose_files_changed_is_reported_and_never_served(tmp_path):
    """Injects: one byte of the current version's stored model.safetensors changed on disk.
    Asserts: `current()` and promotion refuse it with a WeightsError naming the file and the
    recovery; it stays listed, the history is intact; rolling back to an earlier version
    works; registering the same weights again repairs the copy, which is served again."""
    store = WeightsStore(url=str(tmp_path / "store"))
    old, _ = store.register(MODEL, str(weights(tmp_path / "old", "old")))
    store.set_current(MODEL, old.digest, "first")
    source = weights(tmp_path / "new", "new")
    new, _ = store.register(MODEL, str(source))
    store.set_current(MODEL, new.digest, "second")

    stored = Path(new.uri) / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[1000] ^= 0xFF
    stored.write_bytes(bytes(data))

    assert store.verify(MODEL, new.digest) is False
    for refused in (
        lambda: store.current(MODEL),
        lambda: store.set_current(MODEL, new.digest, "again"),
    ):
        with pytest.raises(WeightsError) as info:
            refused()
        message = str(info.value)
        assert f"version {new.digest[:12]} of {MODEL}" in message
        assert "model.safetensors" in message and "it is not served" in message
        assert "Register the same weights again" in message
    assert {v.digest for v in store.versions(MODEL)} == {old.digest, new.digest}
    assert [h["reason"] for h in store.history(MODEL)] == ["first", "second"]

    assert store.rollback(MODEL).digest == old.digest
    assert store.current(MODEL) == old
    again, fresh = store.register(MODEL, str(source))
    assert (again.digest, fresh) == (new.digest, False)
    assert store.verify(MODEL, new.digest)
    assert store.set_current(MODEL, new.digest, "repaired").digest == new.digest
    assert store.current(MODEL) == new


COPY = textwrap.dedent(
    """
    import resource, signal, sys
    from homelab_dagster.errors import WeightsError
    from resources.weights import WeightsStore

    store, source, limit, kill = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    # Python ignores SIGXFSZ (the write fails with EFBIG); the default action kills it.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL if kill == "yes" else signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        WeightsStore(url=store).register("fault-model", source)
    except WeightsError as exc:
        print(exc)
        sys.exit(3)
    """
)


@pytest.mark.parametrize("killed", [False, True], ids=["write-fails", "process-killed"])
def test_an_interrupted_copy_lists_no_half_version_and_the_next_register_stores_it(
    tmp_path, killed
):
    """Injects: a file-size limit (RLIMIT_FSIZE) of 1 MiB on the process that registers
    2 MiB weights, so the kernel stops the copy inside model.safetensors: the write fails
    (EFBIG), or the process is killed (SIGXFSZ). Asserts: the failure is a WeightsError naming
    the source (or the process died by SIGXFSZ); no version is listed and no
    `versions/<digest>` directory exists; the staging directory is removed when the process
    lives to clean up; the next register stores the version, which verifies and is served."""
    root = tmp_path / "store"
    source = weights(tmp_path / "src", "w")
    done = subprocess.run(
        [sys.executable, "-c", COPY, str(root), str(source), str(LIMIT), "yes" if killed else "no"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    if killed:
        assert done.returncode == -signal.SIGXFSZ, done.stdout + done.stderr
    else:
        assert done.returncode == 3, done.stdout + done.stderr
        assert f"cannot register {source} as {MODEL}" in done.stdout
        assert "File too large" in done.stdout
    partial = list((root / MODEL / "staging").glob("*/model.safetensors"))
    if killed:  # the kernel stopped it mid-file: the half copy is there, in staging only
        assert [p.stat().st_size for p in partial] == [LIMIT]
    else:
        assert partial == []
    store = WeightsStore(url=str(root))
    assert store.versions(MODEL) == []
    assert not list((root / MODEL).glob("versions/*"))

    version, new = store.register(MODEL, str(source))
    assert new and store.verify(MODEL, version.digest)
    assert [v.digest for v in store.versions(MODEL)] == [version.digest]
    assert store.set_current(MODEL, version.digest, "after the fault") == version
