"""The twin's real nodes: a real kubelet and containerd for each node marked ``twin: real``.

Every other node of the twin is a KWOK fake node. A real node runs, on the machine that runs
the twin, its own containerd (root, state and socket of its own, Debian's runc and CNI
plugins) and a kubelet built from the same Kubernetes module as the twin's control plane.
The kubelet registers the node with its cluster's API server; the node's labels, taints and
``nvidia.com/gpu`` capacity then come from the inventory (the GPUs are patched into the node
status after each kubelet start: there is no GPU here).

Everything a real node owns lives under ``<state>/twin/real/<node>/``: configuration, data,
logs, pids and ``host_changes.json``, the record of what it changed on the host (its address
on ``lo``, its bridge, its cgroups). What the kubelets change for the whole host (iptables
chains, sysctls such as ``ip_forward``, ``/var/log/containers``) is recorded once, before the
first real node starts, in ``<state>/twin/real/host.json``. :meth:`RealNodes.stop` kills the
node's processes, unmounts what was mounted under its directory and undoes its record; the
last node to stop also undoes the host record. Stopping always leaves the host as it was;
``purge`` also deletes the node's data (images, pods' state).

Real nodes need Linux, root, the toolchain's kubelet and pause binary, and Debian's
containerd, runc, containernetworking-plugins and iptables. :func:`unavailable` says which
of these is missing; the twin then runs every node as a KWOK node and says so once.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from homelab_dagster.errors import RealNodeError
from homelab_dagster.inventory import Inventory, Node
from homelab_dagster.twin_nodes import GPU_RESOURCE, node_manifest

if TYPE_CHECKING:
    from homelab_dagster.twin import TwinTools

__all__ = [
    "APT_PACKAGES",
    "PAUSE_IMAGE_REPOSITORY",
    "RealNodeSpec",
    "RealNodeStatus",
    "RealNodes",
    "oci_archive",
    "real_nodes_of",
    "unavailable",
]

# What `make system-deps` installs for real nodes (Debian package names).
APT_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables")
PAUSE_IMAGE_REPOSITORY = "registry.k8s.io/pause"
CNI_BIN_DIR = Path("/usr/lib/cni")
_CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
_HOST_BINARIES = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip")
# Sysctls the kubelet sets (protectKernelDefaults: false) or the bridge plugin turns on.
_SYSCTLS = (
    "net.ipv4.ip_forward",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
# Made on the host whatever the configuration says: the kubelet's symlinks to pod logs, its
# device-plugin socket and checkpoint (a fixed path), containerd's shim sockets, the CNI
# library's result cache, util-linux's mount table. Removed with the last real node if they
# did not exist before the first; the last three hold only the twin's files by then, unless
# another kubelet or containerd runs on the machine.
_HOST_DIRS = (
    "/var/log/containers",
    "/run/mount",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/run/containerd",
)
_HOST_DIRS_OWNED = ("/var/lib/kubelet", "/var/lib/cni", "/run/containerd")
_KUBELET_PORT = 10250
_READY_TIMEOUT_S = 90
_STOP_TIMEOUT_S = 10
# Real nodes take the two ports of their cluster's port block that the control plane does not
# use (offsets 6 and 7, homelab_dagster.twin): the port names the node's address on `lo`
# (198.18.0.0/15, the benchmarking range, never routed), its bridge and its cgroup.
_PORT_OFFSETS = (6, 7)
_ADDRESS_NET = ipaddress.IPv4Network("198.18.0.0/15")


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
    if not _cgroup_mounts():
        return "no cgroup file system is mounted under /sys/fs/cgroup"
    return None


def _which(binary: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    found = shutil.which(binary, path=path)
    if not found:
        raise RealNodeError(f"{binary} is not installed (`make system-deps`)")
    return found


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
        return str(_ADDRESS_NET[self.port])

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
    ) -> None:
        self.inventory = inventory
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
            RealNodeSpec(cluster, node, base + offset, self.root / node.name)
            for node, offset in zip(nodes, _PORT_OFFSETS, strict=False)
        ]

    def pod_subnet(self, spec: RealNodeSpec) -> ipaddress.IPv4Network:
        """A /24 at the end of the cluster's pod range (the controller allocates from the start)."""
        pods = self.inventory.clusters[spec.cluster].network.pod_cidr
        if pods.prefixlen >= 24:
            return pods
        index = _PORT_OFFSETS.index(spec.port - self._block_port(spec.cluster))
        return list(pods.subnets(new_prefix=24))[-1 - index]

    # ------------------------------------------------------------------ up

    def up(self, cluster: str, api: Any, report: Report) -> list[str]:
        """Start (or repair) every real node of ``cluster``; return what was done, per node."""
        done = []
        for spec in self.specs(cluster):
            done.append(f"{spec.name}: {self._up_one(spec, api, report)}")
        return done

    def _up_one(self, spec: RealNodeSpec, api: Any, report: Report) -> str:
        containerd_up = _alive(self._pid(spec, "containerd"), spec.dir)
        kubelet_up = _alive(self._pid(spec, "kubelet"), spec.dir)
        if containerd_up and kubelet_up:
            self._apply_inventory(spec, api)
            return "running"
        _record_host(self.root / "host.json")
        self._prepare(spec)
        actions = []
        if not containerd_up:
            report(spec.cluster, f"{spec.name}: starting containerd")
            self._start(
                spec,
                "containerd",
                [_which("containerd"), "--config", str(spec.path("containerd.toml"))],
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
        ip = _which("ip")
        shown = _run([ip, "-o", "addr", "show", "dev", "lo"]).stdout
        if f" {spec.address}/" not in shown:
            _run([ip, "addr", "add", f"{spec.address}/32", "dev", "lo"], check=True)
            changes["address"] = spec.address
        changes["bridge"] = spec.bridge
        changes["cgroup_root"] = spec.cgroup_root
        # The kubelet requires its cgroup root to exist (in every hierarchy on cgroup v1).
        for mount in _cgroup_mounts():
            path = mount / spec.cgroup_root.lstrip("/")
            if not path.exists():
                path.mkdir()
            for name in ("cpuset.cpus", "cpuset.mems"):  # empty in a new v1 cpuset cgroup
                own, parent = path / name, mount / name
                if own.exists() and not own.read_text().strip():
                    own.write_text(parent.read_text())
        self._save_changes(spec, changes)
        self._write_configs(spec)

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
        subnet = self.pod_subnet(spec)
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
                        "dataDir": str(spec.path("cni", "ipam")),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        spec.path("cni", "net.d", "10-homelab-twin.conflist").write_text(json.dumps(cni, indent=1))
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
        log = spec.path("logs", f"{what}.log").open("ab")
        env = {
            **os.environ,
            "PATH": os.pathsep.join(
                ["/usr/local/sbin", "/usr/sbin", "/sbin", os.environ.get("PATH", "/usr/bin:/bin")]
            ),
        }
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=spec.dir,
            start_new_session=True,  # outlives the command that started it, like kwokctl's
        )
        log.close()
        spec.path("pids", f"{what}.pid").write_text(str(proc.pid))

    def _wait_socket(self, spec: RealNodeSpec) -> None:
        ctr = _which("ctr")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (
                spec.socket.exists()
                and _run([ctr, "--address", str(spec.socket), "version"]).returncode == 0
            ):
                return
            if not _alive(self._pid(spec, "containerd"), spec.dir):
                break
            time.sleep(0.2)
        log = spec.path("logs", "containerd.log")
        raise RealNodeError(f"real node {spec.name}: containerd did not start:\n{_tail(log)}")

    def _import_pause(self, spec: RealNodeSpec) -> None:
        version = self.toolchain.versions["tools"]["pause"]["version"]
        name = f"{PAUSE_IMAGE_REPOSITORY}:{version}"
        if name in self.images(spec):
            return
        pause = self.toolchain.pause
        if pause is None:  # unavailable() said so before any node started
            raise RealNodeError(f"real node {spec.name}: the toolchain has no pause binary")
        archive = oci_archive(name, {"pause": pause}, entrypoint=["/pause"])
        self.import_image(spec, archive)

    def images(self, spec: RealNodeSpec) -> set[str]:
        """The image names in the node's containerd (the namespace the kubelet uses)."""
        res = _run(
            [_which("ctr"), "--address", str(spec.socket), "-n", "k8s.io", "images", "ls", "-q"]
        )
        return set(res.stdout.split())

    def import_image(self, spec: RealNodeSpec, archive: bytes) -> None:
        """Import an OCI archive (see :func:`oci_archive`) into the node's containerd."""
        path = spec.path(f".import-{os.getpid()}.tar")
        path.write_bytes(archive)
        try:
            res = _run(
                [
                    _which("ctr"),
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
            if not _alive(self._pid(spec, "kubelet"), spec.dir):
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
            + _tail(spec.path("logs", "kubelet.log"))
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
        labels = {**manifest["metadata"]["labels"], "type": "real"}
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
            containerd = _alive(self._pid(spec, "containerd"), spec.dir)
            kubelet = _alive(self._pid(spec, "kubelet"), spec.dir)
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
            _undo_host(self.root / "host.json")
            if purge and self.root.is_dir() and not any(self.root.iterdir()):
                self.root.rmdir()
        return stopped

    def _stop_one(self, spec: RealNodeSpec, *, purge: bool) -> None:
        _terminate(self._pid(spec, "kubelet"), spec.dir)
        # The pods: through containerd while it runs (its shims then exit and clean up after
        # themselves), then whatever is left in the node's cgroups, then leftover shims.
        if _alive(self._pid(spec, "containerd"), spec.dir):
            ctr = [_which("ctr"), "--address", str(spec.socket), "-n", "k8s.io", "tasks"]
            tasks = _run([*ctr, "ls", "-q"]).stdout.split()
            for task in tasks:
                _run([*ctr, "kill", "--all", "--signal", "SIGKILL", task])
            for task in tasks:
                _run([*ctr, "delete", "--force", task])
        for pid in _cgroup_pids(spec.cgroup_root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in _pids_with_argument(str(spec.socket)):
            if pid != self._pid(spec, "containerd"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _terminate(self._pid(spec, "containerd"), spec.dir)
        for what in ("kubelet", "containerd"):
            spec.path("pids", f"{what}.pid").unlink(missing_ok=True)
        _unmount_under(spec.dir)
        changes = self._changes(spec)
        _remove_cgroup(spec.cgroup_root)
        ip = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
        if ip:
            links = _run([ip, "-o", "link", "show", "master", spec.bridge]).stdout
            for line in links.splitlines():  # veths whose namespace is not gone yet
                name = line.split(":")[1].strip().split("@")[0]
                _run([ip, "link", "del", name])
            if _run([ip, "link", "show", spec.bridge]).returncode == 0:
                _run([ip, "link", "del", spec.bridge])
            # Its address: recorded when added; also removed when a lost record left it (the
            # address comes from the twin's own port, in a range no network uses).
            for address in {changes.get("address"), spec.address} - {None}:
                if f" {address}/" in _run([ip, "-o", "addr", "show", "dev", "lo"]).stdout:
                    _run([ip, "addr", "del", f"{address}/32", "dev", "lo"])
        _remove_log_links(spec.dir)
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
                _alive(_read_pid(d / "pids" / f"{w}.pid"), d) for w in ("kubelet", "containerd")
            ):
                return True
        return False

    # ------------------------------------------------------------------ records

    def _pid(self, spec: RealNodeSpec, what: str) -> int | None:
        return _read_pid(spec.path("pids", f"{what}.pid"))

    def _changes(self, spec: RealNodeSpec) -> dict[str, Any]:
        try:
            return json.loads(spec.path("host_changes.json").read_text())
        except (OSError, ValueError):
            return {}

    def _save_changes(self, spec: RealNodeSpec, changes: dict[str, Any]) -> None:
        spec.path("host_changes.json").write_text(json.dumps(changes, indent=1))


# --------------------------------------------------------------------------- images


def oci_archive(
    name: str,
    files: dict[str, Path | str],
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
) -> bytes:
    """A one-layer OCI image archive, as ``ctr images import`` takes it, named ``name``.

    ``files`` maps a path in the image to a file on this machine (copied, mode kept) or, for a
    ``str`` value starting with ``->``, a symlink target (``{"bin/sh": "->busybox"}``).
    The layer is reproducible (fixed mtimes and owners), so the same files give the same digest.
    """
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for target in sorted(files):
            parts = target.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    dirs.add(d)
            source = files[target]
            info = tarfile.TarInfo(target.strip("/"))
            if isinstance(source, str) and source.startswith("->"):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, source[2:], 0o777
                tar.addfile(info)
            else:
                data = Path(source).read_bytes()
                info.size, info.mode = len(data), Path(source).stat().st_mode & 0o7777
                tar.addfile(info, io.BytesIO(data))
    layer = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    blob = gzip.compress(layer, mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": ["PATH=/bin:/usr/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()

    def descriptor(media: str, data: bytes, **extra: Any) -> dict[str, Any]:
        return {
            "mediaType": media,
            "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data),
            **extra,
        }

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", blob)],
        },
        sort_keys=True,
    ).encode()
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                descriptor(
                    "application/vnd.oci.image.manifest.v1+json",
                    manifest,
                    annotations={
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": tag,
                    },
                    platform={"architecture": "amd64", "os": "linux"},
                )
            ],
        }
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:

        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for data in (config, manifest, blob):
            add(f"blobs/sha256/{hashlib.sha256(data).hexdigest()}", data)
    return out.getvalue()


# --------------------------------------------------------------------------- host record


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _iptables_state(binary: str) -> dict[str, dict[str, list[str]]]:
    """``{table: {"chains": [...], "rules": [...]}}`` from ``<binary>-save`` (no counters)."""
    save = shutil.which(f"{binary}-save", path="/usr/sbin:/sbin:/usr/bin")
    if not save:
        return {}
    text = _run([save]).stdout
    tables: dict[str, dict[str, list[str]]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            tables[table] = {"chains": [], "rules": []}
        elif line.startswith(":") and table:
            tables[table]["chains"].append(line[1:].split()[0])
        elif line.startswith("-A") and table:
            tables[table]["rules"].append(line)
    return tables


def host_snapshot() -> dict[str, Any]:
    """What real nodes may change on the host: iptables, sysctls, a few directories."""
    return {
        "sysctls": {
            s: _sysctl_path(s).read_text().strip() for s in _SYSCTLS if _sysctl_path(s).exists()
        },
        "iptables": {b: _iptables_state(b) for b in ("iptables", "ip6tables")},
        "dirs": {d: Path(d).exists() for d in _HOST_DIRS},
    }


def _record_host(path: Path) -> None:
    """Take the host-wide record once, before the first real node of the twin starts."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(host_snapshot(), indent=1))
    os.replace(tmp, path)


def _undo_host(path: Path) -> None:
    """Put back what the record says: iptables chains and rules, sysctls, directories."""
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for binary, tables_before in before.get("iptables", {}).items():
        exe = shutil.which(binary, path="/usr/sbin:/sbin:/usr/bin")
        if not exe:
            continue
        now = _iptables_state(binary)
        for table, state in now.items():
            old = tables_before.get(table, {"chains": [], "rules": []})
            new_chains = [c for c in state["chains"] if c not in old["chains"]]
            for rule in state["rules"]:
                if rule in old["rules"]:
                    continue
                args = shlex.split(rule)
                if args[1] in new_chains:
                    continue  # flushed with its chain below
                _run([exe, "-w", "-t", table, "-D", *args[1:]])
            for chain in new_chains:
                _run([exe, "-w", "-t", table, "-F", chain])
            for chain in new_chains:
                _run([exe, "-w", "-t", table, "-X", chain])
    for name, value in before.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            if _sysctl_path(name).read_text().strip() != value:
                _sysctl_path(name).write_text(value)
    others = _other_runtimes()
    for d, existed in before.get("dirs", {}).items():
        if existed:
            continue
        if d in _HOST_DIRS_OWNED and not others:
            shutil.rmtree(d, ignore_errors=True)
        else:
            _remove_empty_tree(Path(d))
    path.unlink(missing_ok=True)


def _other_runtimes() -> list[int]:
    """Kubelets and containerds running on the machine (this twin's are stopped by now)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                name, rest = (entry / "stat").read_text().split(" (", 1)[1].rsplit(") ", 1)
                if name in ("kubelet", "containerd") and rest.split()[0] != "Z":  # not zombies
                    pids.append(int(entry.name))
    return pids


def _remove_empty_tree(path: Path) -> None:
    if not path.is_dir() or path.is_symlink():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            _remove_empty_tree(child)
    with contextlib.suppress(OSError):
        path.rmdir()


def _remove_log_links(node_dir: Path) -> None:
    """The kubelet's symlinks in /var/log/containers that point into ``node_dir``."""
    logs = Path("/var/log/containers")
    if not logs.is_dir():
        return
    for link in logs.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(str(node_dir) + "/"):
                link.unlink()


# --------------------------------------------------------------------------- processes


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None, node_dir: Path) -> bool:
    """Whether ``pid`` runs and is one of ``node_dir``'s processes (its command line says so)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    # A process exec'd a moment ago may show an empty command line for a few milliseconds.
    return state != "Z" and (not cmdline or str(node_dir) in cmdline)


def _terminate(pid: int | None, node_dir: Path) -> None:
    if not _alive(pid, node_dir):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while _alive(pid, node_dir) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if _alive(pid, node_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid, node_dir):
            _reap(pid)
            time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect ``pid`` if this process started it (a child left as a zombie otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _pids_with_argument(arg: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------- mounts, cgroups


def _cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point (v1 controllers, and the v2 tree if mounted)."""
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] in ("cgroup", "cgroup2"):
                mounts.append(Path(fields[1]))
    return mounts


def _cgroup_pids(root: str) -> list[int]:
    pids: set[int] = set()
    for mount in _cgroup_mounts():
        base = mount / root.lstrip("/")
        if not base.is_dir():
            continue
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def _remove_cgroup(root: str) -> None:
    """Remove ``root`` from every hierarchy, deepest first (killed tasks take a moment to go)."""
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while True:
        left = []
        for mount in _cgroup_mounts():
            base = mount / root.lstrip("/")
            if not base.is_dir():
                continue
            for d in sorted(
                (p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            try:
                base.rmdir()
            except OSError:
                left.append(base)
        if not left:
            return
        if time.monotonic() > deadline:
            raise RealNodeError(
                f"cgroups left behind (processes still in them?): {', '.join(map(str, left))}"
            )
        for pid in _cgroup_pids(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo, escapes decoded)."""
    prefix = str(path)
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _unmount_under(path: Path) -> None:
    for _ in range(10):
        points = mounts_under(path)
        if not points:
            return
        for point in sorted(set(points), key=lambda p: -p.count("/")):
            if _run(["umount", point]).returncode != 0:
                _run(["umount", "-l", point])
    left = mounts_under(path)
    if left:
        raise RealNodeError(f"could not unmount {', '.join(left)}")


# --------------------------------------------------------------------------- helpers


def _run(cmd: Iterable[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    args = list(cmd)
    res = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RealNodeError(f"{' '.join(args)} failed: {(res.stderr or res.stdout).strip()}")
    return res


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _api_errors() -> tuple[type[Exception], ...]:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    return (ApiException, urllib3.exceptions.HTTPError, OSError)
