"""The twin's real nodes: a real kubelet and containerd for each node marked ``twin: real``.

Every other node of the twin is a KWOK fake node. A real node runs, on the machine that runs
the twin, its own containerd (root, state and socket of its own, Debian's runc and CNI
plugins) and a kubelet built from the same Kubernetes module as the twin's control plane.
The kubelet registers the node with its cluster's API server; the node's labels, taints and
``nvidia.com/gpu`` capacity then come from the inventory (the GPUs are patched into the node
status after each kubelet start: there is no GPU here).

Everything a real node owns lives under ``<state>/twin/real/<port>/`` (named by its port):
configuration, data, logs, pids and ``host_changes.json``, the record of what it changed on the
host (its address on ``lo``, its bridge, its cgroups). What the kubelets change for the whole
host (iptables chains, sysctls such as ``ip_forward``, ``/var/log/containers``) is recorded
once, before the first real node starts, in ``<state>/twin/real/host.json``.
:meth:`RealNodes.stop` kills the node's processes, unmounts what was mounted under its
directory and undoes its record; the last node to stop also undoes the host record. Stopping
always leaves the host as it was; ``purge`` also deletes the node's data (images, pods' state).
The process, mount, cgroup and host-record helpers are :mod:`homelab_dagster.twin_host`'s. A
real node's containerd pulls the homelab's image names (``ghcr.io/...``) from the twin's
registry on loopback (:mod:`homelab_dagster.twin_registry`), through ``certs.d`` mirrors.

Real nodes need Linux, root, the toolchain's kubelet and pause binary, and Debian's
containerd, runc, containernetworking-plugins and iptables. :func:`unavailable` says which
of these is missing; the twin then runs every node as a KWOK node and says so once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from homelab_dagster.errors import RealNodeError
from homelab_dagster.images import MIRRORED_REGISTRIES, mirror_hosts_toml, oci_archive
from homelab_dagster.inventory import Inventory, Node
from homelab_dagster.twin_host import (
    TWIN_ADDRESSES,
    add_loopback_address,
    alive,
    cgroup_mounts,
    cgroup_pids,
    loopback_address,
    pids_with_argument,
    read_pid,
    record_host,
    remove_cgroup,
    remove_log_links,
    remove_loopback_address,
    run,
    start_process,
    tail,
    terminate,
    undo_host,
    unmount_under,
    which,
)
from homelab_dagster.twin_nodes import GPU_RESOURCE, REAL_NODE_LABELS, node_manifest
from homelab_dagster.twin_registry import APT_PACKAGE as REGISTRY_APT

if TYPE_CHECKING:
    from homelab_dagster.twin import TwinTools

__all__ = [
    "APT_PACKAGES",
    "PAUSE_IMAGE_REPOSITORY",
    "RealNodeSpec",
    "RealNodeStatus",
    "RealNodes",
    "real_nodes_of",
    "unavailable",
]

# What `make system-deps` installs for real nodes (Debian package names).
APT_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", REGISTRY_APT)
PAUSE_IMAGE_REPOSITORY = "registry.k8s.io/pause"
CNI_BIN_DIR = Path("/usr/lib/cni")
_CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
_HOST_BINARIES = (
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "ctr",
    "iptables",
    "ip",
    "docker-registry",  # the twin's registry, which the real nodes pull from
)
_KUBELET_PORT = 10250
_READY_TIMEOUT_S = 90
# Real nodes take the two ports of their cluster's port block that the control plane does not
# use (offsets 6 and 7, homelab_dagster.twin): the port names the node's address on `lo`
# (198.18.0.0/15, the benchmarking range, never routed), its bridge and its cgroup.
_PORT_OFFSETS = (6, 7)
_MAX_SOCKET_PATH = 107  # sockaddr_un's sun_path, less its terminating NUL


def real_nodes_of(inventory: Inventory, cluster: str) -> list[Node]:
    """The nodes of ``cluster`` that the inventory marks ``twin: real``."""
    return [n for n in inventory.clusters[cluster].expanded_nodes() if n.twin == "real"]


def unavailable(toolchain: TwinTools) -> str | None:
    """Why real nodes cannot run on this machine (and how to fix it), or None when they can."""
    if not sys.platform.startswith("linux"):
        return (
            f"this machine runs {sys.platform}, and a kubelet with containerd needs Linux "
            "(cgroups, network namespaces)"
        )
    if os.geteuid() != 0:
        return (
            "not root: a kubelet with containerd needs root (cgroups, mounts, network "
            "namespaces, iptables); run the twin as root, e.g. in a Linux VM"
        )
    if toolchain.kubelet is None or toolchain.pause is None:
        return "the toolchain's kubelet and pause binary are not built: run `make tools`"
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    missing = [b for b in _HOST_BINARIES if not shutil.which(b, path=path)]
    missing += [f"{CNI_BIN_DIR}/{p}" for p in _CNI_PLUGINS if not (CNI_BIN_DIR / p).exists()]
    if missing:
        return (
            f"missing {', '.join(missing)}: install Debian's packages with `make system-deps` "
            f"(apt-get install -y {' '.join(APT_PACKAGES)})"
        )
    if not cgroup_mounts():
        return "no cgroup file system is mounted under /sys/fs/cgroup"
    return None


@dataclass(frozen=True)
class RealNodeSpec:
    """Where one real node lives: its directory, address, bridge, pod subnet and cgroup."""

    cluster: str
    node: Node
    port: int  # the spare port of the cluster's block that names it
    dir: Path

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def address(self) -> str:
        return loopback_address(self.port)

    @property
    def bridge(self) -> str:
        return f"hltw{self.port}"

    @property
    def cgroup_root(self) -> str:
        return f"/homelab-twin-{self.port}"

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)


@dataclass(frozen=True)
class RealNodeStatus:
    """What ``twin status`` reports of a real node: its processes and its Node's state."""

    cluster: str
    name: str
    address: str
    containerd: bool
    kubelet: bool
    ready: bool
    gpus: int
    kubelet_version: str
    message: str = ""

    @property
    def running(self) -> bool:
        return self.containerd and self.kubelet


Report = Callable[[str, str], None]


class RealNodes:
    """The real nodes of one twin: ``root`` is ``<state>/twin/real``."""

    def __init__(
        self,
        inventory: Inventory,
        root: Path,
        toolchain: TwinTools,
        *,
        block_port: Callable[[str], int],
        kubeconfig: Callable[[str], dict[str, Any]],
        mirror: str | None = None,
    ) -> None:
        self.inventory = inventory
        self.mirror = mirror  # the twin's registry (host:port), where the homelab's images are
        self.root = root
        self.toolchain = toolchain
        self._block_port = block_port
        self._kubeconfig = kubeconfig

    # ------------------------------------------------------------------ plan

    def specs(self, cluster: str) -> list[RealNodeSpec]:
        nodes = real_nodes_of(self.inventory, cluster)
        if len(nodes) > len(_PORT_OFFSETS):
            raise RealNodeError(
                f"cluster {cluster!r} has {len(nodes)} real nodes; the twin runs at most "
                f"{len(_PORT_OFFSETS)} per cluster"
            )
        base = self._block_port(cluster)
        return [
            # Named by its port, not its name: the kubelet's sockets live below this directory,
            # and a Unix socket's path has at most 107 bytes.
            RealNodeSpec(cluster, node, base + offset, self.root / str(base + offset))
            for node, offset in zip(nodes, _PORT_OFFSETS, strict=False)
        ]

    def pod_subnet(self, spec: RealNodeSpec) -> ipaddress.IPv4Network:
        """A /24 of the upper half of the cluster's pod range (the controller allocates from
        the start), chosen by the node's port: two twins on one machine (a developer's and a
        test session's) then give their nodes' bridges different subnets, so the host routes
        each pod's answers to its own bridge (the same subnet twice sent them to the first)."""
        pods = self.inventory.clusters[spec.cluster].network.pod_cidr
        if pods.prefixlen >= 24:
            return pods
        subnets = list(pods.subnets(new_prefix=24))
        return subnets[-1 - spec.port % max(1, len(subnets) // 2)]

    # ------------------------------------------------------------------ up

    def up(self, cluster: str, api: Any, report: Report) -> list[str]:
        """Start (or repair) every real node of ``cluster``; return what was done, per node."""
        done = []
        for spec in self.specs(cluster):
            done.append(f"{spec.name}: {self._up_one(spec, api, report)}")
        return done

    def _up_one(self, spec: RealNodeSpec, api: Any, report: Report) -> str:
        containerd_up = alive(self._pid(spec, "containerd"), spec.dir)
        kubelet_up = alive(self._pid(spec, "kubelet"), spec.dir)
        if containerd_up and kubelet_up:
            self._write_network(spec, running=True)
            # containerd may have dropped it since (its image GC under disk pressure): without
            # it no pod's sandbox starts on the node (FailedCreatePodSandBox, for ever).
            repaired = self._import_pause(spec)
            self._apply_inventory(spec, api)
            return "running, its pause image imported again" if repaired else "running"
        socket = spec.path("kubelet", "root", "pod-resources", "0123456789")
        if len(str(socket).encode()) > _MAX_SOCKET_PATH:
            raise RealNodeError(
                f"real node {spec.name}: the twin's state directory {self.root.parent.parent} is "
                f"too deep for the kubelet's Unix sockets ({socket} is over "
                f"{_MAX_SOCKET_PATH} bytes); set HOMELAB_STATE_DIR to a shorter path"
            )
        record_host(self.root / "host.json")
        self._prepare(spec)
        actions = []
        if not containerd_up:
            report(spec.cluster, f"{spec.name}: starting containerd")
            self._start(
                spec,
                "containerd",
                [which("containerd"), "--config", str(spec.path("containerd.toml"))],
            )
            self._wait_socket(spec)
            actions.append("containerd started")
        self._import_pause(spec)
        if not kubelet_up:
            report(spec.cluster, f"{spec.name}: starting the kubelet")
            since = time.time()
            self._start(spec, "kubelet", self._kubelet_command(spec))
            actions.append("kubelet started")
            self._wait_ready(spec, api, since)
        self._apply_inventory(spec, api)
        return ", ".join(actions)

    def _prepare(self, spec: RealNodeSpec) -> None:
        """Directories, configuration, the node's address, its cgroup; recorded as made."""
        if len(str(spec.socket)) + len(".ttrpc") > 107:
            raise RealNodeError(
                f"{spec.socket}: too long for a unix socket; use a shorter HOMELAB_STATE_DIR"
            )
        for sub in (
            "logs",
            "pids",
            "containerd/root",
            "containerd/state",
            "kubelet/pki",
            "cni/net.d",
        ):
            spec.path(*sub.split("/")).mkdir(parents=True, exist_ok=True)
        changes = self._changes(spec)
        # The address: the kubelet refuses a loopback node IP; one on `lo` stays local.
        if add_loopback_address(spec.address):
            changes["address"] = spec.address
        changes["bridge"] = spec.bridge
        changes["cgroup_root"] = spec.cgroup_root
        # The kubelet requires its cgroup root to exist (in every hierarchy on cgroup v1).
        for mount in cgroup_mounts():
            path = mount / spec.cgroup_root.lstrip("/")
            if not path.exists():
                path.mkdir()
            for name in ("cpuset.cpus", "cpuset.mems"):  # empty in a new v1 cpuset cgroup
                own, parent = path / name, mount / name
                if own.exists() and not own.read_text().strip():
                    own.write_text(parent.read_text())
        self._save_changes(spec, changes)
        self._write_configs(spec)

    def _write_network(self, spec: RealNodeSpec, *, running: bool = False) -> None:
        """The node's CNI configuration (read by containerd for each new pod sandbox). On a
        ``running`` node only where its subnet stays (new pods get a route added); a new
        subnet waits for the node's next start, its bridge holding the old one till then."""
        subnet = self.pod_subnet(spec)
        path = spec.path("cni", "net.d", "10-homelab-twin.conflist")
        if running and str(subnet) not in (path.read_text() if path.exists() else ""):
            return
        cni = {
            "cniVersion": "1.0.0",
            "name": f"homelab-twin-{spec.port}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": spec.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(subnet)}]],
                        # The one route out of the pod's subnet: to the twin's addresses on
                        # this machine's `lo` (the object store's), through the bridge.
                        "routes": [{"dst": str(TWIN_ADDRESSES)}],
                        "dataDir": str(spec.path("cni", "ipam")),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        path.write_text(json.dumps(cni, indent=1))

    def _write_configs(self, spec: RealNodeSpec) -> None:
        sandbox = f"{PAUSE_IMAGE_REPOSITORY}:{self.toolchain.versions['tools']['pause']['version']}"
        containerd = f"""\
# Written by homelab_dagster/twin_real.py for the twin's real node {spec.name}.
version = 2
root = "{spec.path("containerd", "root")}"
state = "{spec.path("containerd", "state")}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{spec.socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{spec.path("containerd", "opt")}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  # The VM drops CAP_SYS_RESOURCE: without this every sandbox dies with
  # "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    # A layer's compressed blob goes once unpacked: the registry keeps it, and an image in
    # both forms would hold 3 GiB twice on each node that runs training or vLLM.
    discard_unpacked_layers = true
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{spec.path("runc")}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{spec.path("cni", "net.d")}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{spec.path("certs.d")}"
"""
        spec.path("containerd.toml").write_text(containerd)
        self._write_mirrors(spec)
        self._write_network(spec)
        cluster_dir = self._kubeconfig(spec.cluster)
        ca = cluster_dir["ca_file"]
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": spec.address,
            "port": _KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": spec.address,
            "healthzPort": 10248,
            "failCgroupV1": False,
            "failSwapOn": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": spec.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{spec.socket}",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": ca},
            },
            # Only holders of a certificate of the cluster's CA (the API server) get in.
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": str(spec.path("kubelet", "pod-logs")),
            "volumePluginDir": str(spec.path("kubelet", "volume-plugins")),
            "registerWithTaints": [t.manifest() for t in spec.node.taints],
            "clusterDomain": "cluster.local",
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "maxPods": 110,
            "nodeStatusReportFrequency": "10s",
        }
        spec.path("kubelet.yaml").write_text(yaml.safe_dump(kubelet))
        fd = os.open(spec.path("kubelet.kubeconfig"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(cluster_dir["kubeconfig"], f)

    def _write_mirrors(self, spec: RealNodeSpec) -> None:
        """``certs.d/<registry>/hosts.toml`` per registry of the homelab's images: containerd
        resolves and pulls them from the twin's registry (read at each pull: no restart)."""
        certs = spec.path("certs.d")
        shutil.rmtree(certs, ignore_errors=True)
        if self.mirror is None:
            return
        for host in MIRRORED_REGISTRIES:
            (certs / host).mkdir(parents=True, exist_ok=True)
            (certs / host / "hosts.toml").write_text(mirror_hosts_toml(host, self.mirror))

    def _kubelet_command(self, spec: RealNodeSpec) -> list[str]:
        return [
            str(self.toolchain.kubelet),
            "--config",
            str(spec.path("kubelet.yaml")),
            "--kubeconfig",
            str(spec.path("kubelet.kubeconfig")),
            "--root-dir",
            str(spec.path("kubelet", "root")),
            "--cert-dir",
            str(spec.path("kubelet", "pki")),
            "--hostname-override",
            spec.name,
            "--node-ip",
            spec.address,
            "--v=1",
        ]

    def _start(self, spec: RealNodeSpec, what: str, cmd: list[str]) -> None:
        log, pid_file = spec.path("logs", f"{what}.log"), spec.path("pids", f"{what}.pid")
        start_process(cmd, log=log, pid_file=pid_file, cwd=spec.dir)

    def _wait_socket(self, spec: RealNodeSpec) -> None:
        ctr = which("ctr")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (
                spec.socket.exists()
                and run([ctr, "--address", str(spec.socket), "version"]).returncode == 0
            ):
                return
            if not alive(self._pid(spec, "containerd"), spec.dir):
                break
            time.sleep(0.2)
        log = spec.path("logs", "containerd.log")
        raise RealNodeError(f"real node {spec.name}: containerd did not start:\n{tail(log)}")

    def _import_pause(self, spec: RealNodeSpec) -> bool:
        """Import the pause image (every pod's sandbox) unless the node has it; True if it
        was imported."""
        version = self.toolchain.versions["tools"]["pause"]["version"]
        name = f"{PAUSE_IMAGE_REPOSITORY}:{version}"
        if name in self.images(spec):
            return False
        pause = self.toolchain.pause
        if pause is None:  # unavailable() said so before any node started
            raise RealNodeError(f"real node {spec.name}: the toolchain has no pause binary")
        archive = oci_archive(name, {"pause": pause}, entrypoint=["/pause"])
        self.import_image(spec, archive)
        return True

    def images(self, spec: RealNodeSpec) -> set[str]:
        """The image names in the node's containerd (the namespace the kubelet uses)."""
        res = run(
            [which("ctr"), "--address", str(spec.socket), "-n", "k8s.io", "images", "ls", "-q"]
        )
        return set(res.stdout.split())

    def import_image(self, spec: RealNodeSpec, archive: bytes) -> None:
        """Import an OCI archive (see :func:`oci_archive`) into the node's containerd."""
        path = spec.path(f".import-{os.getpid()}.tar")
        path.write_bytes(archive)
        try:
            res = run(
                [
                    which("ctr"),
                    "--address",
                    str(spec.socket),
                    "-n",
                    "k8s.io",
                    "images",
                    "import",
                    str(path),
                ]
            )
        finally:
            path.unlink(missing_ok=True)
        if res.returncode != 0:
            raise RealNodeError(
                f"real node {spec.name}: ctr images import failed: {res.stderr.strip()}"
            )

    def _wait_ready(self, spec: RealNodeSpec, api: Any, since: float) -> None:
        """Until the Node is Ready by a heartbeat of the kubelet just started."""
        from kubernetes import client

        core = client.CoreV1Api(api)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not alive(self._pid(spec, "kubelet"), spec.dir):
                break
            with contextlib.suppress(*_api_errors()):
                node = core.read_node(spec.name, _request_timeout=5)
                for c in node.status.conditions or []:
                    beat = c.last_heartbeat_time.timestamp() if c.last_heartbeat_time else 0
                    if c.type == "Ready" and c.status == "True" and beat >= int(since):
                        return
            time.sleep(0.25)
        raise RealNodeError(
            f"real node {spec.name} of {spec.cluster!r}: not Ready within {_READY_TIMEOUT_S}s "
            f"of starting its kubelet; its log ({spec.path('logs', 'kubelet.log')}) ends:\n"
            + tail(spec.path("logs", "kubelet.log"))
        )

    def _apply_inventory(self, spec: RealNodeSpec, api: Any) -> None:
        """The inventory's labels, taints and GPUs on the Node the kubelet registered.

        GPUs are an extended resource patched into the status: the kubelet keeps it through its
        status updates, but a kubelet with a fresh root directory zeroes it, so this runs after
        every kubelet start (and on every ``up``, where it costs one read).
        """
        from kubernetes import client

        core = client.CoreV1Api(api)
        manifest = node_manifest(spec.node)
        labels = {**manifest["metadata"]["labels"], **REAL_NODE_LABELS}
        node = core.read_node(spec.name, _request_timeout=10)
        current = node.metadata.labels or {}
        taints = [
            {k: v for k, v in (("key", t.key), ("value", t.value), ("effect", t.effect)) if v}
            for t in node.spec.taints or []
            if not t.key.startswith("node.kubernetes.io/")  # the node controller's own
        ]
        if (
            any(current.get(k) != v for k, v in labels.items())
            or taints != manifest["spec"]["taints"]
        ):
            core.patch_node(spec.name, {"metadata": {"labels": labels}, "spec": manifest["spec"]})
        want = str(spec.node.gpus)
        capacity = node.status.capacity or {}
        allocatable = node.status.allocatable or {}
        status: dict[str, Any] = {}
        if spec.node.gpus and (
            capacity.get(GPU_RESOURCE) != want or allocatable.get(GPU_RESOURCE) != want
        ):
            status.update(capacity={GPU_RESOURCE: want}, allocatable={GPU_RESOURCE: want})
        # The KWOK controller may still patch the fake node it knew by this name (its port for
        # logs and exec) just after the kubelet registered the real one; the kubelet puts its
        # own port back only with its next status update.
        endpoints = node.status.daemon_endpoints
        port = endpoints.kubelet_endpoint.port if endpoints and endpoints.kubelet_endpoint else 0
        if port != _KUBELET_PORT:
            status["daemonEndpoints"] = {"kubeletEndpoint": {"Port": _KUBELET_PORT}}
        if status:
            core.patch_node_status(spec.name, {"status": status})

    # ------------------------------------------------------------------ status

    def status(self, cluster: str, api: Any | None) -> list[RealNodeStatus]:
        out = []
        for spec in self.specs(cluster):
            containerd = alive(self._pid(spec, "containerd"), spec.dir)
            kubelet = alive(self._pid(spec, "kubelet"), spec.dir)
            ready, gpus, version, message = False, 0, "", ""
            if api is not None:
                from kubernetes import client

                try:
                    node = client.CoreV1Api(api).read_node(spec.name, _request_timeout=5)
                    ready = any(
                        c.type == "Ready" and c.status == "True"
                        for c in node.status.conditions or []
                    )
                    gpus = int((node.status.allocatable or {}).get(GPU_RESOURCE, "0"))
                    version = node.status.node_info.kubelet_version if node.status.node_info else ""
                except _api_errors() as exc:
                    message = f"node not readable ({type(exc).__name__})"
            down = [
                what for what, up in (("containerd", containerd), ("kubelet", kubelet)) if not up
            ]
            if down:
                message = f"{' and '.join(down)} not running" + (f"; {message}" if message else "")
            out.append(
                RealNodeStatus(
                    spec.cluster,
                    spec.name,
                    spec.address,
                    containerd,
                    kubelet,
                    ready,
                    gpus,
                    version,
                    message,
                )
            )
        return out

    # ------------------------------------------------------------------ stop

    def stop(self, cluster: str, *, purge: bool = False) -> list[str]:
        """Stop ``cluster``'s real nodes, undo their host changes; ``purge``: their data too.

        When no real node of this twin runs any more, the host-wide record is undone as well.
        Returns the names of the nodes it stopped or cleaned.
        """
        stopped = []
        for spec in self.specs(cluster):
            if spec.dir.exists():
                self._stop_one(spec, purge=purge)
                stopped.append(spec.name)
        if stopped and not self._any_running():
            undo_host(self.root / "host.json")
            if purge and self.root.is_dir() and not any(self.root.iterdir()):
                self.root.rmdir()
        return stopped

    def _stop_one(self, spec: RealNodeSpec, *, purge: bool) -> None:
        terminate(self._pid(spec, "kubelet"), spec.dir)
        # The pods: through containerd while it runs (its shims then exit and clean up after
        # themselves), then whatever is left in the node's cgroups, then leftover shims.
        if alive(self._pid(spec, "containerd"), spec.dir):
            ctr = [which("ctr"), "--address", str(spec.socket), "-n", "k8s.io", "tasks"]
            tasks = run([*ctr, "ls", "-q"]).stdout.split()
            for task in tasks:
                run([*ctr, "kill", "--all", "--signal", "SIGKILL", task])
            for task in tasks:
                run([*ctr, "delete", "--force", task])
        for pid in cgroup_pids(spec.cgroup_root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids_with_argument(str(spec.socket)):
            if pid != self._pid(spec, "containerd"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        terminate(self._pid(spec, "containerd"), spec.dir)
        for what in ("kubelet", "containerd"):
            spec.path("pids", f"{what}.pid").unlink(missing_ok=True)
        unmount_under(spec.dir)
        changes = self._changes(spec)
        remove_cgroup(spec.cgroup_root)
        ip = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
        if ip:
            links = run([ip, "-o", "link", "show", "master", spec.bridge]).stdout
            for line in links.splitlines():  # veths whose namespace is not gone yet
                name = line.split(":")[1].strip().split("@")[0]
                run([ip, "link", "del", name])
            if run([ip, "link", "show", spec.bridge]).returncode == 0:
                run([ip, "link", "del", spec.bridge])
            # Its address: recorded when added; also removed when a lost record left it (the
            # address comes from the twin's own port, in a range no network uses).
            for address in {str(a) for a in (changes.get("address"), spec.address) if a}:
                remove_loopback_address(address)
        remove_log_links(spec.dir)
        shutil.rmtree(spec.path("cni", "ipam"), ignore_errors=True)  # no sandbox survives
        sandboxes = spec.path("containerd", "root", "io.containerd.grpc.v1.cri", "sandboxes")
        ids = [d.name for d in sandboxes.iterdir()] if sandboxes.is_dir() else []
        results = Path("/var/lib/cni/results")  # the CNI library's cache, one file per network
        if results.is_dir():
            for f in results.iterdir():
                if f.name.startswith(f"homelab-twin-{spec.port}-") or any(i in f.name for i in ids):
                    f.unlink(missing_ok=True)
        spec.path("host_changes.json").unlink(missing_ok=True)
        if purge:
            shutil.rmtree(spec.dir, ignore_errors=True)

    def _any_running(self) -> bool:
        if not self.root.is_dir():
            return False
        for d in self.root.iterdir():
            if d.is_dir() and any(
                alive(read_pid(d / "pids" / f"{w}.pid"), d) for w in ("kubelet", "containerd")
            ):
                return True
        return False

    # ------------------------------------------------------------------ records

    def _pid(self, spec: RealNodeSpec, what: str) -> int | None:
        return read_pid(spec.path("pids", f"{what}.pid"))

    def _changes(self, spec: RealNodeSpec) -> dict[str, Any]:
        try:
            return json.loads(spec.path("host_changes.json").read_text())
        except (OSError, ValueError):
            return {}

    def _save_changes(self, spec: RealNodeSpec, changes: dict[str, Any]) -> None:
        spec.path("host_changes.json").write_text(json.dumps(changes, indent=1))


def _api_errors() -> tuple[type[Exception], ...]:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    return (ApiException, urllib3.exceptions.HTTPError, OSError)
