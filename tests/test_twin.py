"""The twin: real control planes, simulated nodes from the inventory, real scheduling."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest
from _twin_support import assert_refused_for_gpus, wait

from homelab_dagster.errors import PortInUseError, TwinError
from homelab_dagster.twin import Twin

pytestmark = pytest.mark.twin


def _nodes(twin, cluster):
    from kubernetes import client

    return client.CoreV1Api(twin.client(cluster)).list_node().items


def test_forge_has_eight_nodes_three_with_two_a100s(twin):
    twin.up(["forge", "studio"])
    nodes = _nodes(twin, "forge")
    assert len(nodes) == 8
    gpu_nodes = {
        n.metadata.name
        for n in nodes
        if n.status.allocatable.get("nvidia.com/gpu") == "2"
        and n.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    }
    assert gpu_nodes == {"forge-training-primary", "forge-training-secondary", "forge-inference"}
    assert all(
        any(c.type == "Ready" and c.status == "True" for c in n.status.conditions) for n in nodes
    )
    assert len(_nodes(twin, "studio")) == 12


def test_kubectl_works_against_the_twin_by_hand(twin):
    twin.up(["forge"])
    env = {**os.environ, **twin.env()}
    out = subprocess.run(
        [str(twin.toolchain.kubectl), "--context", "twin-forge", "get", "nodes", "-o", "name"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(out) == 8 and "node/forge-inference" in out


def _gpu_pod(name: str, gpus: int) -> dict:
    # A KWOK training node (forge-training-primary and forge-inference are real nodes,
    # tests/test_twin_real.py), so the pod is Running once bound, whatever its image.
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"role": "training", "type": "kwok"},
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }


def test_the_scheduler_places_two_gpus_and_refuses_three(twin):
    from kubernetes import client

    twin.up(["forge"])
    core = client.CoreV1Api(twin.client("forge"))
    core.create_namespaced_pod("default", _gpu_pod("fits", 2))
    core.create_namespaced_pod("default", _gpu_pod("too-big", 3))
    try:
        fits = wait(
            lambda: (
                (p := core.read_namespaced_pod("fits", "default")).status.phase == "Running" and p
            )
        )
        assert fits, "the 2-GPU pod never reached Running"
        assert fits.spec.node_name == "forge-training-secondary"

        assert_refused_for_gpus(core, "too-big")
    finally:
        for name in ("fits", "too-big"):
            core.delete_namespaced_pod(name, "default", grace_period_seconds=0)


def test_up_is_idempotent_and_restarts_a_killed_control_plane(twin):
    twin.up(["air"])
    (before,) = [s for s in twin.status() if s.name == "air"]
    assert before.running and before.nodes == 4
    messages: list[str] = []
    twin.up(["air"], progress=lambda c, m: messages.append(f"{c}: {m}"))
    assert "air: running" in messages
    pid = _apiserver_pid(twin, "air")
    os.kill(pid, signal.SIGKILL)
    wait(lambda: not next(s for s in twin.status() if s.name == "air").running, timeout=20)
    (down,) = [s for s in twin.status() if s.name == "air"]
    assert not down.running and "not answering" in down.message
    messages.clear()
    twin.up(["air"], progress=lambda c, m: messages.append(f"{c}: {m}"))
    assert "air: not answering: restarting" in messages
    (after,) = [s for s in twin.status() if s.name == "air"]
    assert after.running and after.ready_nodes == 4


def test_controllers_run_without_leader_election_and_fill_a_token(twin):
    """One controller-manager and one scheduler per cluster, so no leader election: with it, a
    lease not renewed in time on a loaded machine made the controller-manager exit for good
    (a CI run: a link's service-account token never filled). Asserts: no leader lease in
    kube-system, and the token controller fills a service-account token secret."""
    from kubernetes import client

    twin.up(["air"])
    api = twin.client("air")
    leases = {
        lease.metadata.name
        for lease in client.CoordinationV1Api(api).list_namespaced_lease("kube-system").items
    }
    assert not leases & {"kube-controller-manager", "kube-scheduler"}, leases
    _assert_token_filled(api, "lease-check")


def test_up_starts_a_controller_manager_that_exited(twin):
    """Injects: air's kube-controller-manager killed (what an exit leaves: kwokctl does not
    restart it). Asserts: status names it; up starts it alone (the API server keeps its pid);
    its token controller then fills a token."""
    import psutil

    twin.up(["air"])
    air_dir = str(twin.workdir / "clusters" / "air")
    (manager,) = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"]
        and os.path.basename(p.info["cmdline"][0]) == "kube-controller-manager"
        and any(air_dir + os.sep in arg for arg in p.info["cmdline"])
    ]
    manager.kill()
    manager.wait(10)
    (down,) = [s for s in twin.status() if s.name == "air"]
    assert down.running and "kube-controller-manager not running" in down.message
    apiserver = _apiserver_pid(twin, "air")
    messages: list[str] = []
    twin.up(["air"], progress=lambda c, m: messages.append(f"{c}: {m}"))
    assert "air: kube-controller-manager not running: starting" in messages
    assert _apiserver_pid(twin, "air") == apiserver
    (after,) = [s for s in twin.status() if s.name == "air"]
    assert after.message == ""
    _assert_token_filled(twin.client("air"), "restarted")


def _apiserver_pid(twin: Twin, cluster: str) -> int:
    port = twin.api_port(cluster)
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN":
            return conn.pid
    raise AssertionError(f"nothing listens on {port}")


def test_a_twin_refuses_another_port_base_than_it_started_with(twin, tmp_path, twin_port_base):
    # A twin of its own, whose clusters never start (a squatter holds pi's etcd port): up
    # records its port base first.
    started = Twin(twin.inventory, tmp_path, twin.toolchain, api_port_base=twin_port_base + 400)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", started.ports("pi")["etcdPort"]))
        squatter.listen()
        with pytest.raises(PortInUseError):
            started.up(["pi"])
    other = Twin(twin.inventory, tmp_path, twin.toolchain, api_port_base=twin_port_base + 500)
    with pytest.raises(
        TwinError, match=rf"started with HOMELAB_TWIN_PORT_BASE={twin_port_base + 400}"
    ):
        other.down(purge=True)
    assert (tmp_path / "twin" / "port-base").is_file()  # nothing deleted
    started.down(purge=True)
    assert not (tmp_path / "twin").exists()


def test_a_taken_port_is_a_clear_error(twin, tmp_path, twin_port_base):
    # A twin of its own, whose clusters were never started: the session twin may run pi.
    fresh = Twin(twin.inventory, tmp_path, twin.toolchain, api_port_base=twin_port_base + 400)
    port = fresh.ports("pi")["etcdPort"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        expected = rf"'pi' needs 127.0.0.1:{port} \(its etcd\).*pid {os.getpid()}"
        with pytest.raises(PortInUseError, match=expected):
            fresh.up(["pi"])


def _assert_token_filled(api, name: str) -> None:
    """The cluster's token controller fills a service-account token secret within 60 s."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    core.create_namespaced_service_account("default", {"metadata": {"name": name}})
    secret = {
        "metadata": {
            "name": f"{name}-token",
            "annotations": {"kubernetes.io/service-account.name": name},
        },
        "type": "kubernetes.io/service-account-token",
    }
    core.create_namespaced_secret("default", secret)
    try:
        assert wait(
            lambda: (core.read_namespaced_secret(f"{name}-token", "default").data or {}).get(
                "token"
            ),
            timeout=60,
        ), f"the token of {name} was never filled in"
    finally:
        core.delete_namespaced_secret(f"{name}-token", "default")
        core.delete_namespaced_service_account(name, "default")
