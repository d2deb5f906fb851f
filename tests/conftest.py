"""Shared fixtures: the project root, the shipped inventory, and a way to break it."""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The repository's root."""
    return ROOT


@pytest.fixture(scope="session")
def shipped_inventory_data() -> dict[str, Any]:
    """The shipped homelab.yaml as plain data (never mutate: use ``inventory_text``)."""
    return YAML(typ="safe").load((ROOT / "homelab.yaml").read_text())


@pytest.fixture
def inventory_text(shipped_inventory_data: dict[str, Any]) -> Callable[..., str]:
    """``inventory_text(edit)``: the shipped inventory, changed by ``edit(data)``, as YAML."""

    def make(edit: Callable[[dict[str, Any]], None] | None = None) -> str:
        data = copy.deepcopy(shipped_inventory_data)
        if edit:
            edit(data)
        buffer = io.StringIO()
        YAML(typ="safe").dump(data, buffer)
        return buffer.getvalue()

    return make


# ---------------------------------------------------------------------------- the twin


@pytest.fixture(scope="session")
def toolchain():
    """The twin's toolchain, already built (``make tools``); CI fails without it."""
    from homelab_dagster.errors import ToolchainError
    from infra.toolchain import ensure_toolchain

    try:
        return ensure_toolchain(build=False)
    except ToolchainError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the twin's toolchain is missing in CI: {exc}")
        pytest.skip(f"the twin's toolchain is not built (run `make tools`): {exc}")


@pytest.fixture(scope="session")
def shipped_inventory(project_root):
    """The shipped inventory, validated."""
    from homelab_dagster.loader import load_inventory

    return load_inventory(project_root / "homelab.yaml").inventory


@pytest.fixture(scope="session")
def twin_port_base():
    """The first port of this session's twin: ``HOMELAB_TEST_TWIN_PORT_BASE`` where set, else
    the first of 26443, 27443, ... that no other test session holds (a lock file per block,
    held for the session), so that two sessions on one machine never share ports."""
    import fcntl
    import tempfile

    if "HOMELAB_TEST_TWIN_PORT_BASE" in os.environ:
        yield int(os.environ["HOMELAB_TEST_TWIN_PORT_BASE"])
        return
    for base in range(26443, 32000 - 1000, 1000):
        lock = open(os.path.join(tempfile.gettempdir(), f"homelab-test-twin-{base}.lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        try:
            yield base
        finally:
            lock.close()
        return
    pytest.fail("every block of test twin ports is held by another test session")


@pytest.fixture(scope="session")
def twin_scratch(twin_port_base, toolchain, shipped_inventory):
    """Where this session's twins keep their state: ``$TMPDIR/hl-<port base>``, short (a real
    node's Unix sockets live below it) and this session's alone (it holds the port block's
    lock). What a killed session left there (real nodes' processes, mounts and images: many
    GiB, enough to fill the disk of the next run) is stopped and removed first; every twin
    under it is purged at the end."""
    import tempfile

    root = Path(tempfile.gettempdir()) / f"hl-{twin_port_base}"
    _purge_twins(root, shipped_inventory, toolchain)
    root.mkdir()
    yield root
    _purge_twins(root, shipped_inventory, toolchain)


def _purge_twins(root: Path, inventory, toolchain) -> None:
    """Purge each twin whose state is a directory of ``root``, then ``root`` itself."""
    import shutil

    from homelab_dagster.twin import Twin
    from homelab_dagster.twin_host import unmount_under

    if not root.exists():
        return
    for record in root.glob("*/twin/port-base"):
        state = record.parent.parent
        base = int(record.read_text())
        Twin(inventory, state, toolchain, api_port_base=base).down(purge=True)
    unmount_under(root)
    shutil.rmtree(root)


@pytest.fixture(scope="session")
def twin(twin_scratch, toolchain, shipped_inventory, twin_port_base):
    """A twin of the shipped inventory in this session's scratch directory, purged at the end.

    Clusters start on demand: ``twin.up(["forge"])`` in a test (idempotent, so tests that
    share a cluster pay for it once). Ports start at :func:`twin_port_base`, away from a
    developer's own twin (16443) and from any other test session's.
    """
    from homelab_dagster.twin import Twin

    state = twin_scratch / "session"
    instance = Twin(shipped_inventory, state, toolchain, api_port_base=twin_port_base)
    yield instance
    instance.down(purge=True)


@pytest.fixture(scope="session")
def object_store(twin):
    """The session twin's S3 object store (versitygw), started once (as ``twin up`` does)."""
    twin.store.up(for_pods=False)  # kept as it runs where real nodes started it for pods
    return twin.store


@pytest.fixture
def weights_store(object_store):
    """A weights store of the twin's configuration on a bucket of its own (created by the
    first write)."""
    import uuid

    from resources.weights import WeightsStore

    return WeightsStore(
        bucket=f"test-{uuid.uuid4().hex[:12]}",
        endpoint_url=f"http://{object_store.address}",
        credentials_file=str(object_store.credentials),
    )


# ---------------------------------------------------------------------------- the ml extra


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI the ``ml`` extra must be installed: its tests skip without it, never there."""
    from _ml_support import missing_ml_modules

    missing = missing_ml_modules()
    if os.environ.get("CI") and missing:
        raise pytest.UsageError(
            f"CI is set but the ml extra is not installed ({', '.join(missing)} missing), so "
            "the tests that train would skip: install it (`make install`, or "
            "`uv sync --extra ml`)"
        )


# ---------------------------------------------------------------------------- real twin nodes


@pytest.fixture(scope="session")
def real_forge(twin):
    """The session twin's forge with its real node (forge-inference: a kubelet and containerd).

    Where real nodes cannot run (not Linux, not root, packages or tools missing) the test
    skips with the twin's reason; in CI running as root on Linux it fails instead (`make tools`
    installs and builds what they need there).
    """
    import sys

    twin.up(["forge"])
    if twin.real_fallback is not None:
        root_on_linux = sys.platform.startswith("linux") and os.geteuid() == 0
        if os.environ.get("CI") and root_on_linux:
            pytest.fail(f"real nodes are required in CI: {twin.real_fallback}")
        pytest.skip(str(twin.real_fallback))
    return twin


# ---------------------------------------------------------------------------- Dagster's services


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree(pid: int) -> set[int]:
    """``pid`` and its live descendants (from /proc; zombies count as gone)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    tree = {pid} if pid in parents else set()
    grew = True
    while grew:
        children = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


class HomelabDev:
    """``homelab dev`` running in its own session: its port, process and output."""

    def __init__(self, env: dict[str, str], log: Path, port: int) -> None:
        import subprocess
        import sys

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        homelab = str(Path(sys.executable).with_name("homelab"))
        self.process = subprocess.Popen(
            [homelab, "dev", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the webserver answers (fails with the log's tail if the process ends)."""
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"homelab dev exited {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"homelab dev did not answer within {timeout}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        """What it printed so far."""
        return self.log.read_text(errors="replace")

    def stop(self, sig: int | None = None, *, group: bool = False, timeout: float = 15) -> float:
        """Send ``sig`` (SIGTERM) to the process (to its process group if ``group``, as a
        terminal's Ctrl-C does) and wait for every process of its tree to end; the seconds it
        took. Whatever is left after ``timeout`` is killed, and the test fails."""
        import contextlib
        import signal
        import time

        tree = process_tree(self.process.pid)
        start = time.monotonic()
        sig = signal.SIGTERM if sig is None else sig
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        left: set[int] = tree
        while time.monotonic() - start < timeout:
            self.process.poll()
            left = set().union(*(process_tree(p) for p in tree))
            if not left:
                return time.monotonic() - start
            time.sleep(0.25)
        commands = {}
        for pid in left:
            with contextlib.suppress(OSError):
                commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        pytest.fail(f"still running {timeout}s after the signal: {commands}\n{self.output()}")


@pytest.fixture
def dagster_env(tmp_path) -> dict[str, str]:
    """The environment for Dagster's services in a test: a temporary ``DAGSTER_HOME`` and
    ``HOMELAB_STATE_DIR``, the real ``HOMELAB_*`` settings otherwise unset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(tmp_path / "dagster-home")
    env["HOMELAB_STATE_DIR"] = str(tmp_path / "state")
    return env


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's ``postgresql``: ``make system-deps``) on a free
    port of 127.0.0.1, with a password; yields its URL (database ``dagster``), and stops it.

    Where it cannot start (not installed, no user to run it as) the test skips with the
    reason; in CI it fails instead. PostgreSQL refuses to run as root: as root it runs as
    the ``postgres`` user the package creates.
    """
    import glob
    import pwd
    import shutil
    import subprocess
    import tempfile

    def unavailable(reason: str):
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {reason}")
        pytest.skip(f"PostgreSQL cannot start here ({reason}; `make system-deps` installs it)")

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not bins:
        unavailable("no /usr/lib/postgresql/*/bin/pg_ctl")
    bindir = Path(bins[-1]).parent
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="homelab-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    password = "s3cret-" + os.urandom(6).hex()
    (root / "pw").write_text(password)
    if prefix:
        os.chown(root / "pw", user.pw_uid, user.pw_gid)
    port = free_port()
    data = root / "data"

    def run(*args: str) -> None:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            unavailable(f"{Path(args[0]).name} failed: {done.stderr.strip()[-500:]}")

    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "homelab",
            "--auth=scram-sha-256",
            f"--pwfile={root / 'pw'}",
            "-E",
            "UTF8",
            "--no-sync",
        )
        (root / "pw").unlink()
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(root / "log"),
            "-w",
            "start",
        )
        import psycopg2

        base = f"postgresql+psycopg2://homelab:{password}@127.0.0.1:{port}"
        conn = psycopg2.connect(f"postgresql://homelab:{password}@127.0.0.1:{port}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE dagster")
        conn.close()
        yield f"{base}/dagster"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def chrome():
    """Headless Chromium from Debian (``chromium``, ``chromium-driver``: ``make system-deps``)
    driven by Selenium through the system chromedriver (Selenium Manager is never asked: no
    driver download). Skips without them; in CI it fails instead."""
    chromium, driver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    missing = [str(p) for p in (chromium, driver) if not p.is_file()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser is required in CI: {', '.join(missing)} missing")
        pytest.skip(f"no browser: {', '.join(missing)} missing (`make system-deps`)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=str(driver)), options=options)
    yield browser
    browser.quit()


@pytest.fixture
def short_tmp():
    """A temporary directory with a short path, for a state directory holding real nodes:
    their kubelet's Unix sockets live under it, and a socket's path has at most 107 bytes
    (pytest's own tmp_path can be longer than that allows)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="hl-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _live_dagster_instance_in_context():
    """Each test runs inside a live ephemeral Dagster instance's context.

    Dagster keeps the "current" definitions-state storage in a context variable, set by an
    instance's ``with`` block; code that builds a repository (``dg.materialize`` without an
    instance, ``resolve_asset_graph``) reads it. In the full suite (CI, 2026-11-30) an earlier
    test left it pointing at a disposed instance, and later tests failed with "Attempted to
    resolve undefined DagsterInstance weakref" (which test, not yet found: alone, each passes).
    """
    import dagster as dg

    with dg.DagsterInstance.ephemeral():
        yield
