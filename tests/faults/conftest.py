"""Fixtures of the fault suite: Pulumi stacks of the twin target over a temporary state
directory, configured as the twin's deployment configures them.

``HOMELAB_TEST_PULUMI_BACKEND=s3`` (a measurement run only, docs/pulumi.md): the ``stacks``
fixture keeps its state in Pulumi's S3 backend instead, on a versitygw of the session
(``HOMELAB_TEST_PULUMI_S3_PORT``, default 17190), a prefix of one bucket per test. Tests that
run ``homelab`` itself (the twin's deployment) still use the file backend."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from resources.pulumi import PulumiStacks


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state directory of its own (``HOMELAB_STATE_DIR``). Afterwards, any process still
    running a program from it is killed: a Pulumi CLI killed by a fault leaves its provider
    plugins running (about 110 MB each), orphaned."""
    state = tmp_path / "state"
    yield state
    for proc in psutil.process_iter(["cmdline"]):  # the path run (plugins are symlinks)
        if (proc.info["cmdline"] or [""])[0].startswith(f"{state}/"):
            with contextlib.suppress(psutil.Error):
                proc.kill()


PULUMI_S3_BUCKET = "pulumi-state"


@pytest.fixture(scope="session")
def pulumi_object_store(tmp_path_factory, toolchain) -> Iterator[str]:
    """A versitygw holding bucket ``PULUMI_S3_BUCKET``, for ``HOMELAB_TEST_PULUMI_BACKEND=s3``
    only; its address. Its keys are in the environment (``AWS_*``) while it runs."""
    import boto3
    from botocore.config import Config

    from homelab_dagster.twin_store import ObjectStore, read_credentials

    port = int(os.environ.get("HOMELAB_TEST_PULUMI_S3_PORT", "17190"))
    store = ObjectStore(tmp_path_factory.mktemp("pulumi-s3"), port, toolchain.versitygw)
    store.up(for_pods=False)
    access, secret = read_credentials(store.credentials)
    keys = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    with pytest.MonkeyPatch.context() as env:
        for name, value in keys.items():
            env.setenv(name, value)
        boto3.client(
            "s3",
            endpoint_url=f"http://{store.address}",
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        ).create_bucket(Bucket=PULUMI_S3_BUCKET)
        try:
            yield store.address
        finally:
            store.stop(purge=True)


@pytest.fixture
def pulumi_backend(request, state_dir: Path) -> str:
    """The ``stacks`` fixture's backend URL: the file backend under ``state_dir``, or with
    ``HOMELAB_TEST_PULUMI_BACKEND=s3`` a prefix of its own in the session's object store."""
    kind = os.environ.get("HOMELAB_TEST_PULUMI_BACKEND", "file")
    if kind == "file":
        return f"file://{state_dir / 'pulumi' / 'backend'}"
    if kind != "s3":
        pytest.fail(f"HOMELAB_TEST_PULUMI_BACKEND={kind}: file or s3")
    address = request.getfixturevalue("pulumi_object_store")
    prefix = state_dir.parent.name  # tmp_path's name: one per test
    return (
        f"s3://{PULUMI_S3_BUCKET}/{prefix}?endpoint=http://{address}"
        "&use_path_style=true&region=us-east-1"
    )


@pytest.fixture
def stacks(state_dir: Path, pulumi_backend: str, toolchain, monkeypatch) -> PulumiStacks:
    """Stacks of target ``twin`` under ``state_dir``, as ``resources.deployment`` builds them
    (so ``homelab`` commands with ``HOMELAB_STATE_DIR=state_dir`` see the same stacks; on the
    file backend only)."""
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE", raising=False)
    monkeypatch.delenv("PULUMI_BACKEND_URL", raising=False)
    return PulumiStacks(
        target="twin",
        state_dir=str(state_dir),
        backend_url=pulumi_backend,
        passphrase_file=str(state_dir / "pulumi" / "passphrase"),
        generate_passphrase=True,
        install_charts=False,  # as on the twin: chart repositories cannot be reached
        linkerd_link=False,
        lock_wait_s=5,
        lock_poll_s=0.2,
    )


@pytest.fixture
def log() -> logging.Logger:
    return logging.getLogger("faults")


def homelab(
    state_dir: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``homelab ARGS`` (``python -m homelab_dagster``) on ``state_dir``, its output captured
    (``env``: more variables, e.g. ``HOMELAB_INVENTORY``)."""
    import os

    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "PULUMI_"))}
    env["HOMELAB_STATE_DIR"] = str(state_dir)
    env |= extra
    return subprocess.run(
        [sys.executable, "-m", "homelab_dagster", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
    )


class DevUI:
    """``homelab dev`` (the UI's webserver, daemon and code server) on the session twin's state
    directory, driven as the UI drives it: GraphQL over HTTP (launchpad, terminate, run logs)."""

    LOCATION = "homelab"

    def __init__(self, dev) -> None:
        self.dev = dev

    def query(self, query: str, **variables: object) -> dict:
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"{self.dev.url}/graphql",
            data=json.dumps({"query": query, "variables": variables}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            pytest.fail(f"GraphQL answered {exc.code}: {exc.read().decode(errors='replace')}")
        assert "errors" not in body, body
        return body["data"]

    def wait_loaded(self, timeout: float = 300) -> None:
        """Until the code location is loaded (the webserver answers before it is)."""
        import time

        query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entries = self.query(query)["workspaceOrError"].get("locationEntries") or []
            if any(e["name"] == self.LOCATION and e["loadStatus"] == "LOADED" for e in entries):
                return
            time.sleep(1)
        pytest.fail(f"the code location did not load within {timeout}s:\n{self.dev.output()}")

    def launch(self, asset_path: list[str], run_config: dict | None = None) -> dict:
        """The launchpad's *Materialize*: ``launchRun`` of job ``up`` for one asset."""
        params = {
            "selector": {
                "repositoryLocationName": self.LOCATION,
                "repositoryName": "__repository__",
                "jobName": "up",
                "assetSelection": [{"path": asset_path}],
            },
            "runConfigData": run_config or {},
        }
        data = self.query(
            """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
                __typename
                ... on LaunchRunSuccess { run { runId } }
                ... on RunConfigValidationInvalid { errors { message reason } }
                ... on PythonError { message }
                ... on InvalidSubsetError { message }
            } }""",
            p=params,
        )
        return data["launchRun"]

    def terminate(self, run_id: str) -> dict:
        """The run page's *Terminate*."""
        data = self.query(
            """mutation($id: String!) { terminateRun(runId: $id) {
                __typename ... on TerminateRunFailure { message } ... on PythonError { message }
            } }""",
            id=run_id,
        )
        return data["terminateRun"]

    def status(self, run_id: str) -> str:
        data = self.query(
            "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", id=run_id
        )
        return data["runOrError"]["status"]

    def run_ids(self) -> list[str]:
        data = self.query("{ runsOrError { ... on Runs { results { runId } } } }")
        return [r["runId"] for r in data["runsOrError"]["results"]]

    def messages(self, run_id: str) -> list[str]:
        """Every message of the run's event log."""
        data = self.query(
            """query($id: ID!) { logsForRun(runId: $id, limit: 100000) {
                ... on EventConnection { events { ... on MessageEvent { message } } }
            } }""",
            id=run_id,
        )
        return [e["message"] for e in data["logsForRun"]["events"] if e]

    def wait_for_status(self, run_id: str, wanted: set[str], timeout: float = 600) -> str:
        import time

        deadline = time.monotonic() + timeout
        while (status := self.status(run_id)) not in wanted:
            if status in {"SUCCESS", "FAILURE", "CANCELED"} or time.monotonic() > deadline:
                tail = "\n".join(self.messages(run_id)[-30:])
                pytest.fail(f"run {run_id} is {status}, not {wanted}:\n{tail}")
            time.sleep(1)
        return status


@pytest.fixture(scope="package")
def dev_ui(twin, twin_port_base, tmp_path_factory):
    """``homelab dev`` whose target is the session twin (its state directory and ports), for
    the fault tests only, with every schedule and sensor stopped (``HOMELAB_AUTOMATION=off``):
    left running, its drift watch and repairs would run Pulumi on the stacks that later tests
    of the session bring up themselves."""
    import os

    from conftest import HomelabDev, free_port

    tmp = tmp_path_factory.mktemp("dev-ui")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "DAGSTER_"))}
    env.pop("PULUMI_CONFIG_PASSPHRASE", None)
    env.pop("PULUMI_BACKEND_URL", None)
    env |= {
        "DAGSTER_HOME": str(tmp / "dagster-home"),
        "HOMELAB_STATE_DIR": str(twin.root.parent),
        "HOMELAB_TWIN_PORT_BASE": str(twin_port_base),
        "HOMELAB_AUTOMATION": "off",
    }
    dev = HomelabDev(env, tmp / "dev.log", free_port())
    try:
        dev.wait_ready()
        ui = DevUI(dev)
        ui.wait_loaded()
        yield ui
    finally:
        dev.stop(timeout=60)
