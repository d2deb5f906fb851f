"""Fault: secrets that could leak. Canary secrets are planted where the project reads them (a
webhook URL with a token, the Pulumi passphrase, the PostgreSQL password of Dagster's
storage, the twin's client keys, the object store's generated keys), the newcomer's
`make up` (every cluster, the mesh, training, weights, serving) and a `homelab reconcile`
that repairs a drift are run, failing runs are made, and every place a person or tool could
read is searched for them."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _webhook_support import Receiver, evaluate_failure_sensor

from homelab_dagster.twin_store import read_credentials

pytestmark = [pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]
# Pulumi's marker of a secret value in a state file.
SECRET_SIG = "4dabf18193072939515e22adb298388d"


def homelab(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "homelab_dagster", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def key_material(path: Path) -> list[str]:
    """Pieces of a PEM private key as they could appear elsewhere: two lines of its body and
    a stretch of the file in base64 (a kubeconfig's ``client-key-data``)."""
    pem = path.read_bytes()
    body = [line for line in pem.decode().splitlines() if not line.startswith("-----")]
    return [body[2], body[-2], base64.b64encode(pem).decode()[60:120]]


def readable_files(*roots: Path) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            yield root
        elif root.exists():
            yield from (p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def secret_values(node: Any) -> Iterator[dict[str, Any]]:
    """Every value of a Pulumi state marked secret."""
    if isinstance(node, dict):
        if node.get(SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270":
            yield node
        for value in node.values():
            yield from secret_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from secret_values(value)


@pytest.mark.twin
@pytest.mark.slow
@pytest.mark.timeout(2400)  # the whole `make up` (training, a vLLM server) then a reconcile
def test_canary_secrets_never_leak_and_files_holding_secrets_are_private(
    tmp_path, toolchain, twin_port_base, twin_scratch, monkeypatch
):
    """Injects: a webhook URL with a canary token (HOMELAB_WEBHOOK_URL, a real receiver on
    loopback) for every run; what `make up` runs (`homelab up`: the whole twin started with
    the images its pods pull, every stack brought up, the mesh linked, the models trained, their
    weights registered and served, with the generated Pulumi passphrase and the twin's client
    keys in use); a namespace's label changed behind Pulumi's back, found and repaired by
    `homelab reconcile`; a run failing because a canary PULUMI_CONFIG_PASSPHRASE is set,
    announced by the failure sensor through the webhook; a start failing on a PostgreSQL URL
    whose password is a canary.
    Asserts: the receiver got one message naming the failed asset and the reason; no canary,
    passphrase or piece of a private key appears in that message, the terminal output,
    Dagster's storage (event log, run storage, compute logs, asset metadata), the steps' log,
    Pulumi's state (its backend and work directories) or the project's docs; every value
    Pulumi's state marks secret is ciphertext only; every file under the state directory
    holding a secret (passphrase, private keys, kubeconfigs) is mode 0600."""
    from infra.images import missing_tools

    why = missing_tools()
    if why:
        pytest.skip(f"`make up` serves from the twin's images, which cannot be built here: {why}")
    # The session's scratch: short (a real node's sockets live below it), purged if killed.
    state = twin_scratch / "secrets"
    token = f"canary{secrets.token_hex(8)}"
    receiver = Receiver(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMELAB_", "DAGSTER_"))}
    env = {k: v for k, v in env.items() if not k.startswith("PULUMI_")}
    env |= {
        "HOMELAB_STATE_DIR": str(state),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
        "HOMELAB_TWIN_PORT_BASE": str(twin_port_base + 800),
        "HOMELAB_WEBHOOK_URL": receiver.url,
    }
    passphrase_canary = f"canary{secrets.token_hex(8)}"
    postgres_canary = f"canary{secrets.token_hex(8)}"
    try:
        # A fresh twin, its registry empty: `up` puts the images its pods pull there.
        up = homelab(env, "up")
        assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
        assert "image vllm-cpu: pushing" in up.stdout, up.stdout[-3000:]
        assert "vllm_endpoint/sre-agent" in up.stdout, up.stdout[-3000:]

        _tamper_with_a_label(state, toolchain, int(env["HOMELAB_TWIN_PORT_BASE"]))
        reconcile = homelab(env, "reconcile")
        assert reconcile.returncode == 0, (reconcile.stdout + reconcile.stderr)[-3000:]
        # Only what was changed by hand drifted (a whole `up` leaves nothing to repair).
        drifted = re.findall(r"^drift (\S+): ", reconcile.stdout, re.MULTILINE)
        assert drifted == ["cluster/pi"], reconcile.stdout[-3000:]
        assert "Namespace namespace-edge" in " ".join(reconcile.stdout.split())
        assert "repaired cluster/pi " in reconcile.stdout, reconcile.stdout[-3000:]

        failing = homelab(
            env | {"PULUMI_CONFIG_PASSPHRASE": passphrase_canary}, "up", "--env", "pi"
        )
        assert failing.returncode == 1, (failing.stdout + failing.stderr)[-3000:]
        assert "PULUMI_CONFIG_PASSPHRASE is set" in failing.stderr
        _announce_failure(env, monkeypatch)
        assert len(receiver.received) == 1, receiver.received
        path, sent = receiver.received[0]
        assert path.endswith(token)  # delivered to the URL, which the body never repeats
        failed = {a["asset"]: a["reason"] for a in sent["assets"]}
        assert "cluster/pi" in failed, sent
        assert "PULUMI_CONFIG_PASSPHRASE is set" in failed["cluster/pi"], sent
        postgres = env | {
            "DAGSTER_HOME": str(tmp_path / "dagster-pg"),
            "HOMELAB_DAGSTER_POSTGRES_URL": (
                f"postgresql+psycopg2://homelab:{postgres_canary}@127.0.0.1:9/dagster"
            ),
        }
        unreachable = homelab(postgres, "up", "--env", "pi")
        assert unreachable.returncode != 0

        planted = {
            "webhook token": token,
            "PULUMI_CONFIG_PASSPHRASE": passphrase_canary,
            "PostgreSQL password": postgres_canary,
            "generated Pulumi passphrase": (state / "pulumi" / "passphrase").read_text().strip(),
        }
        for key in (state / "twin").rglob("*.key"):
            for i, piece in enumerate(key_material(key)):
                planted[f"{key.relative_to(state)} ({i})"] = piece
        # The object store's generated keys (the weights bucket, the serving pods' Secret).
        store_keys = state / "twin" / "store" / "credentials"
        access, secret = read_credentials(store_keys)
        planted |= {"object store access key": access, "object store secret": secret}

        terminal = {
            "the webhook's message": json.dumps(sent),
            "`up`": up.stdout + up.stderr,
            "`reconcile`": reconcile.stdout + reconcile.stderr,
            "failing `up`": failing.stdout + failing.stderr,
            "`up` on PostgreSQL": unreachable.stdout + unreachable.stderr,
        }
        places = readable_files(
            tmp_path / "dagster",
            tmp_path / "dagster-pg",
            state / "logs",
            state / "pulumi" / "backend",
            state / "pulumi" / "work",
            state / "twin" / "store" / "store.log",
            ROOT / "docs",
        )
        leaks = [
            f"{what} in {where}"
            for where, text in terminal.items()
            for what, value in planted.items()
            if value in text
        ]
        for path in places:
            data = path.read_bytes()
            leaks += [f"{what} in {path}" for what, v in planted.items() if v.encode() in data]
        assert not leaks, leaks

        states = list((state / "pulumi" / "backend" / ".pulumi" / "stacks").rglob("*.json"))
        assert states
        marked = [v for p in states for v in secret_values(json.loads(p.read_text()))]
        assert all("ciphertext" in v and "plaintext" not in v for v in marked), marked

        holding = [
            p
            for p in state.rglob("*")
            if p.is_file()
            and not p.is_symlink()
            and (
                p.suffix == ".key"
                or "kubeconfig" in p.name
                or p.name in ("passphrase", "credentials")
            )
        ]
        assert {state / "pulumi" / "passphrase", state / "twin" / "kubeconfig", store_keys} <= set(
            holding
        )
        loose = {str(p): oct(p.stat().st_mode & 0o777) for p in holding if p.stat().st_mode & 0o077}
        assert not loose, loose
    finally:
        receiver.close()
        homelab(env, "twin", "down", "--purge")
        shutil.rmtree(state, ignore_errors=True)


def _tamper_with_a_label(state: Path, toolchain: Any, port_base: int) -> None:
    """Change the label Pulumi gives pi's namespace ``edge``, as a person with kubectl would:
    through the API server, with the twin's own client credentials."""
    from kubernetes import client

    from homelab_dagster.loader import load_inventory
    from homelab_dagster.twin import Twin

    inventory = load_inventory(ROOT / "homelab.yaml").inventory
    twin = Twin(inventory, state, toolchain, api_port_base=port_base)
    core = client.CoreV1Api(twin.client("pi"))
    label = {"app.kubernetes.io/managed-by": "someone-else"}
    core.patch_namespace("edge", {"metadata": {"labels": label}})


def _announce_failure(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluate the failure sensor, as the daemon does, on the newest failed run of the
    instance of ``env``, with the deployment's resources (its webhook's URL read from
    HOMELAB_WEBHOOK_URL at launch, as in the daemon)."""
    import dagster as dg

    from homelab_dagster.loader import inventory_or_none
    from homelab_dagster.settings import Settings
    from resources.deployment import build_deployment

    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    monkeypatch.setenv("HOMELAB_WEBHOOK_URL", env["HOMELAB_WEBHOOK_URL"])
    settings = Settings.from_env(env)
    resources = build_deployment(settings, inventory_or_none(settings.inventory_path)).resources
    with dg.DagsterInstance.get() as instance:
        (run, *_) = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        evaluate_failure_sensor(
            instance,
            run.run_id,
            {n: resources[n] for n in ("webhook", "dagster_on_kubernetes", "kubernetes")},
        )


@pytest.mark.twin
@pytest.mark.slow
def test_the_ui_listens_on_loopback_only(dev_ui):
    """Injects: nothing: `homelab dev` as started by default. Asserts: every TCP socket its
    processes (webserver, daemon, code servers) listen on is bound to a loopback address."""
    import psutil
    from conftest import process_tree

    tree = process_tree(dev_ui.dev.process.pid)
    listening = [
        (c.pid, c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in tree
    ]
    assert any(port == dev_ui.dev.port for _, _, port in listening), listening
    exposed = [c for c in listening if c[1] not in ("127.0.0.1", "::1")]
    assert not exposed, exposed
