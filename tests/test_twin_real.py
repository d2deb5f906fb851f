"""The twin's real nodes: a real kubelet and containerd run forge-inference's pods.

The inventory marks forge-inference ``twin: real`` (and forge-training-primary, where the
training pods run: tests/test_training_pods_twin.py). These tests need Linux, root, Debian's
containerd, runc, CNI plugins and iptables (`make system-deps`) and the toolchain's kubelet
and pause binary (`make tools`); elsewhere they skip with the twin's reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _twin_support import assert_refused_for_gpus, wait

from homelab_dagster import twin_host, twin_real
from homelab_dagster.errors import RealNodesUnavailable
from homelab_dagster.images import image_reference, oci_archive
from homelab_dagster.twin import Twin
from homelab_dagster.twin_nodes import FAKE_ANNOTATION, GPU_RESOURCE

pytestmark = pytest.mark.twin

NODE = "forge-inference"
IMAGE = "homelab.twin/busybox:1.35"
_SHELL = (
    "echo hello from a real pod; mkdir -p /www; echo real-node-answers > /www/index.html; "
    "exec httpd -f -p 8080 -h /www"
)


def _busybox_archive() -> bytes:
    """A tiny image made here: Debian's static busybox and a few applets (no registry)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        pytest.skip("busybox is not installed (`make system-deps` installs busybox-static)")
    files: dict[str, Path | str] = {"bin/busybox": Path(busybox)}
    for applet in ("sh", "echo", "mkdir", "httpd", "sleep", "cat"):
        files[f"bin/{applet}"] = "->busybox"
    return oci_archive(IMAGE, files, cmd=["sh"])


def _import_busybox(twin: Twin) -> None:
    for spec in twin.real_nodes("forge"):
        if IMAGE not in twin.real.images(spec):
            twin.real.import_image(spec, _busybox_archive())


def _inference(twin: Twin):
    """forge-inference's real-node spec (forge has two real nodes)."""
    (spec,) = [s for s in twin.real_nodes("forge") if s.name == NODE]
    return spec


def _inference_status(forge):
    (real,) = [r for r in forge.real if r.name == NODE]
    return real


def _pod(name: str, gpus: int, image: str = IMAGE, shell: str = _SHELL) -> dict:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "web",
                    "image": image,
                    # The busybox image is imported into containerd; others are pulled
                    # through the registry mirror.
                    "imagePullPolicy": "Never" if image == IMAGE else "IfNotPresent",
                    "command": ["sh", "-c", shell],
                    "ports": [{"containerPort": 8080}],
                    "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
                }
            ],
        },
    }
    if image != IMAGE:
        # Python's server prints before it listens, and kubectl port-forward gives up at the
        # first connection the pod refuses: Ready once it listens.
        container = pod["spec"]["containers"][0]
        container["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    return pod


def _core(twin: Twin):
    from kubernetes import client

    return client.CoreV1Api(twin.client("forge"))


def _running(core, name: str):
    pod = core.read_namespaced_pod(name, "default")
    ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
    return pod if pod.status.phase == "Running" and ready else None


def _delete_pods(core, *names: str) -> None:
    from kubernetes.client.exceptions import ApiException

    for name in names:
        with contextlib.suppress(ApiException):
            core.delete_namespaced_pod(name, "default", grace_period_seconds=0)

    def gone() -> bool:
        left = {p.metadata.name for p in core.list_namespaced_pod("default").items}
        return not left & set(names)

    wait(gone, timeout=30)


def _kubectl(twin: Twin, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(twin.toolchain.kubectl), "--context", "twin-forge", *args],
        env={**os.environ, **twin.env()},
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


# The project's own image: its Python environment (from uv.lock) imports the project, then
# serves one page.
_PROJECT_SHELL = (
    'python -c \'import dagster, homelab_dagster; print("hello from homelab-dagster, dagster", '
    "dagster.__version__, flush=True)' && mkdir -p /tmp/www && "
    "echo project-image-answers > /tmp/www/index.html && "
    "exec python -m http.server 8080 --directory /tmp/www"
)


def _port_forward_get(twin: Twin, pod: str, check: bool = True) -> str:
    """``kubectl port-forward`` to the pod's port 8080, then one HTTP GET through it (with
    ``check=False``: an empty answer where port-forward refuses, to try again)."""
    proc = subprocess.Popen(
        [str(twin.toolchain.kubectl), "--context", "twin-forge", "port-forward", pod, ":8080"],
        env={**os.environ, **twin.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match and not check:
            return ""
        assert match, f"kubectl port-forward said: {line!r}"
        url = f"http://127.0.0.1:{match.group(1)}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- the host


def _iptables(binary: str) -> dict[str, tuple[list[str], list[str]]]:
    """Per table: non-built-in chains and rules (built-in empty chains are not changes: the
    nf_tables backend keeps a table once touched, with its empty built-in chains)."""
    builtin = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}
    state = twin_host.iptables_state(binary)
    out = {}
    for table, s in state.items():
        chains = sorted(c for c in s["chains"] if c not in builtin)
        if chains or s["rules"]:
            out[table] = (chains, sorted(s["rules"]))
    return out


def _host_state(port: int, state: Path) -> dict:
    """What real nodes change on the host. Other twins' real nodes (another test session on
    the machine, the session twin) are left out where they can be told apart: their bridge,
    cgroup and address carry another port, their mounts lie under another state directory."""
    ip = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin") or "ip"

    def ours(name: str) -> bool:
        other = re.search(r"(hltw|homelab-twin-)(\d+)", name)
        return not other or other.group(2) == str(port)

    cgroups = {}
    for mount in twin_host.cgroup_mounts():
        cgroups[str(mount)] = sorted(p.name for p in mount.iterdir() if p.is_dir() and ours(p.name))
    links = subprocess.run([ip, "-o", "link"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    lo = subprocess.run([ip, "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True)
    address = twin_host.loopback_address(port)
    return {
        "iptables": {b: _iptables(b) for b in ("iptables", "ip6tables")},
        # veths of other twins' pods come and go; ours are gone with their namespaces
        "links": sorted(n for n in names if ours(n) and not n.startswith("veth")),
        "veths_on_our_bridge": subprocess.run(
            [ip, "-o", "link", "show", "master", f"hltw{port}"], capture_output=True, text=True
        ).stdout,
        "lo": sorted(
            a
            for a in re.findall(r"inet6? (\S+)", lo.stdout)
            if (not a.startswith("198.18.") and not a.startswith("198.19."))
            or a.startswith(address + "/")
        ),
        "mounts": sorted(
            m
            for m in twin_host.mounts_under(Path("/"))
            if "/twin/real/" not in m or f"/{port}" in m
        ),
        "cgroups": cgroups,
        "sysctls": twin_host.host_snapshot()["sysctls"],
        "paths": {
            p: Path(p).exists()
            for p in (
                "/var/log/containers",
                "/var/log/pods",
                "/run/containerd",
                "/var/lib/containerd",
                "/var/lib/kubelet",
                "/run/netns",
                "/etc/cni",
                "/opt/cni",
            )
        },
    }


def _processes_naming(path: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if str(path) in cmdline:
                    found.append(f"{entry.name}: {cmdline[:120]}")
    return found


# ----------------------------------------------------------------------------- tests
# The host test comes first: the session twin's real node then runs no pods, so the host
# does not change under the comparison.


def test_down_purge_leaves_the_host_as_before(
    toolchain, shipped_inventory, tmp_path_factory, twin_port_base
):
    reason = twin_real.unavailable(toolchain)
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("real")
    fresh = Twin(shipped_inventory, state, toolchain, api_port_base=twin_port_base + 600)
    (port,) = [s.port for s in fresh.real.specs("forge") if s.name == NODE]  # before `up`
    before = _host_state(port, state)
    try:
        fresh.up(["forge"])
        assert fresh.real_fallback is None, fresh.real_fallback
        spec = _inference(fresh)
        _import_busybox(fresh)
        core = _core(fresh)
        core.create_namespaced_pod("default", _pod("web", 2))
        assert wait(lambda: _running(core, "web")), "the pod never ran"
        during = _host_state(port, state)
        assert spec.bridge in during["links"]
        assert f"{spec.address}/32" in during["lo"]
        assert any(spec.cgroup_root.strip("/") in c for c in during["cgroups"].values())
        assert twin_host.mounts_under(state)
    finally:
        fresh.down(purge=True)
    after = _host_state(port, state)
    assert after == before
    assert not twin_host.mounts_under(state)
    assert not _processes_naming(state)
    assert not (state / "twin").exists()


def test_the_inference_node_is_real_ready_with_two_gpus(real_forge):
    core = _core(real_forge)
    node = core.read_node(NODE)
    assert FAKE_ANNOTATION not in (node.metadata.annotations or {})
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    assert node.status.node_info.kubelet_version == "v1.36.3"
    assert node.status.allocatable[GPU_RESOURCE] == "2"
    assert node.metadata.labels["role"] == "inference"
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    spec = _inference(real_forge)
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses["InternalIP"] == spec.address
    others = [
        n for n in core.list_node().items if n.metadata.name not in (NODE, "forge-training-primary")
    ]
    assert len(others) == 6
    assert all((n.metadata.annotations or {}).get(FAKE_ANNOTATION) == "fake" for n in others)
    (forge,) = [s for s in real_forge.status() if s.name == "forge"]
    assert forge.ready_nodes == 8 and forge.gpus == 6
    real = _inference_status(forge)
    assert real.name == NODE and real.running and real.ready and real.gpus == 2
    assert real.kubelet_version == "v1.36.3" and not forge.message


def test_a_two_gpu_pod_runs_logs_and_answers_a_three_gpu_pod_stays_pending(real_forge):
    _import_busybox(real_forge)
    core = _core(real_forge)
    start = time.monotonic()
    core.create_namespaced_pod("default", _pod("web", 2))
    core.create_namespaced_pod("default", _pod("too-big", 3))
    try:
        pod = wait(lambda: _running(core, "web"))
        assert pod, "the 2-GPU pod never reached Running on the real node"
        print(f"2-GPU pod Running after {time.monotonic() - start:.1f} s")
        assert pod.spec.node_name == NODE
        assert pod.status.pod_ip  # an address from the node's bridge
        logs = wait(lambda: _kubectl(real_forge, "logs", "web").stdout, timeout=20)
        assert "hello from a real pod" in logs
        assert _port_forward_get(real_forge, "web").strip() == "real-node-answers"

        assert_refused_for_gpus(core, "too-big")
    finally:
        _delete_pods(core, "web", "too-big")


def test_a_pod_of_the_projects_image_pulled_through_the_registry_runs_logs_and_answers(
    real_forge,
):
    """The acceptance's pod: the project's image (built from uv.lock by `homelab twin images`,
    pulled through containerd's mirror of ghcr.io), 2 GPUs on Forge's inference node."""
    from infra.images import ImageBuilder, missing_tools

    why = missing_tools()
    if why:
        pytest.skip(f"the project's image cannot be built here: {why}")
    real_forge.registry.up()
    ImageBuilder().build_and_push(["homelab-dagster"], real_forge.registry)
    core = _core(real_forge)
    image = image_reference("homelab-dagster")
    start = time.monotonic()
    core.create_namespaced_pod("default", _pod("project", 2, image=image, shell=_PROJECT_SHELL))
    try:
        pod = wait(lambda: _running(core, "project"), timeout=600)
        assert pod, "the project's pod never reached Running on the real node"
        print(f"project image pod Running after {time.monotonic() - start:.1f} s (pull included)")
        assert pod.spec.node_name == NODE
        assert pod.status.container_statuses[0].image.endswith(image.split("/", 1)[1])
        logs = wait(lambda: _kubectl(real_forge, "logs", "project").stdout, timeout=60)
        assert "hello from homelab-dagster, dagster" in logs
        assert _port_forward_get(real_forge, "project").strip() == "project-image-answers"
    finally:
        _delete_pods(core, "project")


def test_a_killed_kubelet_or_containerd_is_seen_and_repaired_by_up(real_forge):
    _import_busybox(real_forge)
    core = _core(real_forge)
    core.create_namespaced_pod("default", _pod("survivor", 1))
    try:
        assert wait(lambda: _running(core, "survivor")), "the pod never ran"
        uid = core.read_namespaced_pod("survivor", "default").metadata.uid
        spec = _inference(real_forge)
        for what in ("kubelet", "containerd"):
            pid = int(spec.path("pids", f"{what}.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            (forge,) = [s for s in real_forge.status() if s.name == "forge"]
            real = _inference_status(forge)
            assert not real.running and f"{what} not running" in real.message
            assert f"real node {NODE}: {what} not running" in forge.message
            messages: list[str] = []
            real_forge.up(["forge"], progress=lambda _c, m, said=messages: said.append(m))
            assert any(f"{what} started" in m for m in messages), messages
            (forge,) = [s for s in real_forge.status() if s.name == "forge"]
            real = _inference_status(forge)
            assert real.running and real.ready and real.gpus == 2, real
            assert core.read_node(NODE).status.allocatable[GPU_RESOURCE] == "2"
            pod = wait(lambda: _running(core, "survivor"))
            assert pod and pod.metadata.uid == uid, f"the pod did not come back after {what}"
        # The API already says Running (its status from before the kills); the restarted
        # kubelet answers a port-forward only once it has taken the pod back ("pod does not
        # exist" until then), so its answer is awaited, not taken at the first try.
        answer = wait(lambda: _port_forward_get(real_forge, "survivor", check=False), timeout=60)
        assert answer.strip() == "real-node-answers", answer
    finally:
        _delete_pods(core, "survivor")


# ----------------------------------------------------------------------------- fallback


def _without_real_node_tools(toolchain):
    """The real toolchain, as found on a machine where kubelet and pause were not built."""
    return dataclasses.replace(toolchain, kubelet=None, pause=None)


def test_without_real_node_tools_every_node_is_fake_and_the_twin_says_so_once(
    shipped_inventory, tmp_path, toolchain
):
    twin = Twin(shipped_inventory, tmp_path, _without_real_node_tools(toolchain))
    said: list[tuple[str, str]] = []
    plan = twin._real_plan(["air", "forge"], lambda c, m: said.append((c, m)))
    assert plan == {"air": set(), "forge": set()}
    assert isinstance(twin.real_fallback, RealNodesUnavailable)
    assert sorted(twin.real_fallback.nodes) == [NODE, "forge-training-primary"]
    assert "make tools" in twin.real_fallback.reason or "Linux" in twin.real_fallback.reason
    assert said == [("forge", f"real nodes run as KWOK nodes: {twin.real_fallback.reason}")]
    twin._real_plan(["forge"], lambda c, m: said.append((c, m)))
    assert len(said) == 1  # said once


def test_real_nodes_need_linux_and_root(monkeypatch, toolchain):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert "needs Linux" in (twin_real.unavailable(toolchain) or "")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert (twin_real.unavailable(toolchain) or "").startswith("not root")


def test_a_pool_of_several_nodes_has_only_its_first_real(inventory_text):
    from homelab_dagster.loader import parse_inventory

    def edit(data):
        pool = data["clusters"]["pi"]["nodes"][1]  # pi-edge, count 2
        pool["twin"] = "real"
        data["clusters"]["forge"]["nodes"][2]["twin"] = "fake"  # forge-training-primary
        data["clusters"]["forge"]["nodes"][4]["twin"] = "fake"  # forge-inference

    inventory = parse_inventory(inventory_text(edit), "homelab.yaml")
    real = [n.name for n in inventory.clusters["pi"].expanded_nodes() if n.twin == "real"]
    assert real == ["pi-edge-1"]
    assert twin_real.real_nodes_of(inventory, "forge") == []
