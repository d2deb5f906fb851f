"""The twin: every inventory cluster as a real local control plane with simulated nodes.

Each cluster is started by ``kwokctl --runtime binary`` (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and the KWOK controller as local processes, every
binary a local path) on its own loopback port. Its nodes are KWOK fake nodes made from the
inventory: names, labels, taints and capacity, ``nvidia.com/gpu`` included, so the real
scheduler places (or refuses) work as it would on the homelab. Nodes the inventory marks
``twin: real`` run a real kubelet and containerd instead (:mod:`homelab_dagster.twin_real`),
where the machine allows it (Linux, root, the packages); elsewhere they are KWOK nodes too,
and the twin says so once (:attr:`Twin.real_fallback`).

State lives under ``<state dir>/twin``: kwokctl's work directory, one kubeconfig with a
context ``twin-<cluster>`` per cluster (mode 0600: it holds client keys), the image
registry the real nodes pull from (:mod:`homelab_dagster.twin_registry`), and the S3 object
store that holds the weights bucket (:mod:`homelab_dagster.twin_store`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from homelab_dagster import twin_nodes, twin_real
from homelab_dagster.errors import PortInUseError, RealNodesUnavailable, TwinError
from homelab_dagster.inventory import Inventory
from homelab_dagster.twin_real import RealNodes, RealNodeStatus
from homelab_dagster.twin_registry import Registry, RegistryStatus
from homelab_dagster.twin_store import ObjectStore, StoreStatus

__all__ = [
    "DEFAULT_API_PORT_BASE",
    "STORE_PORT_INDEX",
    "ClusterStatus",
    "Twin",
    "TwinTools",
    "cluster_kubeconfig",
    "context_name",
    "service_port",
]

DEFAULT_API_PORT_BASE = 16443
_CREATE_TIMEOUT_S = 180
_READY_TIMEOUT_S = 90
_PORTS_FREED_S = 20
# kwokctl's options naming each process's port, in the order of the ports in a block.
_PORT_OPTIONS = (
    "kubeApiserverPort",
    "etcdPort",
    "etcdPeerPort",
    "kubeControllerManagerPort",
    "kubeSchedulerPort",
    "kwokControllerPort",
)
_PORT_BLOCK = 8  # offsets 6 and 7: the cluster's real nodes (homelab_dagster.twin_real)
# kwok-controller manages only the fake nodes (the annotation twin_nodes puts on them), never
# a real node's; the API server reaches kubelets by their address, with the admin certificate
# (which the real kubelets' client CA accepts). Set on every cluster, real nodes or not.
_FAKE_SELECTOR = f"{twin_nodes.FAKE_ANNOTATION}=fake"
_log = logging.getLogger(__name__)


STORE_PORT_INDEX = 2


def service_port(inventory: Inventory, api_port_base: int, index: int) -> int:
    """The twin's ``index``-th port after its clusters' blocks: 0 is its image registry,
    1 the orchestrator's webserver when it runs as a pod (resources/deployment.py), 2 its
    object store (:data:`STORE_PORT_INDEX`)."""
    return api_port_base + _PORT_BLOCK * len(inventory.clusters) + index


def cluster_kubeconfig(state_dir: Path, cluster: str) -> Path:
    """kwokctl's kubeconfig of one twin cluster, its only context current: for tools that
    take a file and no context (dagster-k8s's run launcher and step executor)."""
    return state_dir / "twin" / "kwok" / "clusters" / cluster / "kubeconfig.yaml"


def context_name(cluster: str) -> str:
    """The kubeconfig context of a twin cluster: ``twin-<cluster>``."""
    return f"twin-{cluster}"


@dataclass(frozen=True)
class ClusterStatus:
    """What ``twin status`` reports of one cluster."""

    name: str
    context: str
    server: str
    running: bool
    nodes: int
    ready_nodes: int
    gpus: int
    message: str = ""
    real: tuple[RealNodeStatus, ...] = ()  # the cluster's real nodes (kubelet, containerd)


Progress = Callable[[str, str], None]


class TwinTools(Protocol):
    """What the twin needs of its toolchain (:class:`infra.toolchain.Toolchain` is one; the CLI
    builds it and hands it over, so the core never imports ``infra/``)."""

    kwokctl: Path
    kubelet: Path | None  # None: not built, and every node stays a KWOK node
    pause: Path | None
    versitygw: Path  # the object store (homelab_dagster/twin_store.py)
    versions: dict[str, Any]

    def env(self) -> dict[str, str]:
        """The variables kwokctl and kubectl need (PATH, KWOK_* versions)."""
        ...

    def kwokctl_create_args(self, name: str, kubeconfig: Path | str) -> list[str]:
        """``kwokctl create cluster`` with every binary given as a local path."""
        ...


class Twin:
    """The twin of ``inventory``, kept under ``state_dir/twin``, built with ``toolchain``."""

    def __init__(
        self,
        inventory: Inventory,
        state_dir: Path,
        toolchain: TwinTools,
        *,
        api_port_base: int = DEFAULT_API_PORT_BASE,
    ) -> None:
        self.inventory = inventory
        self.root = state_dir / "twin"
        self.toolchain = toolchain
        self.api_port_base = api_port_base
        self.workdir = self.root / "kwok"
        self.kubeconfig = self.root / "kubeconfig"
        # The image registry on loopback, on the first port after the clusters' blocks.
        self.registry = Registry(self.root / "registry", service_port(inventory, api_port_base, 0))
        # The S3 object store (the weights bucket), on the third.
        self.store = ObjectStore(
            self.root / "store",
            service_port(inventory, api_port_base, STORE_PORT_INDEX),
            toolchain.versitygw,
        )
        self.real = RealNodes(
            inventory,
            self.root / "real",
            toolchain,
            block_port=self.api_port,
            kubeconfig=self._kubelet_credentials,
            mirror=self.registry.address,
        )
        # Why the inventory's real nodes run as KWOK nodes, when they do (set by up()).
        self.real_fallback: RealNodesUnavailable | None = None

    # ------------------------------------------------------------------ public

    def ports(self, cluster: str) -> dict[str, int]:
        """The loopback ports of ``cluster``'s processes: a block of its own per cluster.

        Every port is fixed here rather than picked by kwokctl: clusters created at the
        same time would otherwise race for the same free port (two API servers, one etcd).
        """
        block = self.api_port_base + _PORT_BLOCK * list(self.inventory.clusters).index(cluster)
        return {option: block + offset for offset, option in enumerate(_PORT_OPTIONS)}

    def api_port(self, cluster: str) -> int:
        """The loopback port of ``cluster``'s API server."""
        return self.ports(cluster)["kubeApiserverPort"]

    def env(self) -> dict[str, str]:
        """Variables under which kubectl, kwokctl and pulumi work against the twin."""
        return {
            **self.toolchain.env(),
            "KUBECONFIG": str(self.kubeconfig),
            "KWOK_WORKDIR": str(self.workdir),
        }

    def up(self, clusters: Iterable[str] | None = None, progress: Progress | None = None) -> None:
        """Start what is missing, restart what crashed, reconcile nodes to the inventory.

        Real nodes start (or restart: a killed kubelet or containerd) after their control
        plane, with the image registry they pull from (started or restarted); where they
        cannot run, they are KWOK nodes, and ``real_fallback`` says why (reported once,
        through ``progress`` and the log).

        Raises:
            PortInUseError: a cluster's API port is taken by another process.
            TwinError: a control plane did not start; the message has kwokctl's reason.
            RealNodeError: a real node's containerd or kubelet did not start.
            TwinRegistryError: the image registry did not start.
        """
        names = self._select(clusters)
        report = progress or (lambda _c, _m: None)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._exclusive(names, report):
            self._up(names, report)

    def _up(self, names: list[str], report: Progress) -> None:
        with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
            for _ in pool.map(lambda name: self._up_one(name, report), names):
                pass
        self._write_kubeconfig()
        real = self._real_plan(names, report)
        if any(real.values()):  # the real nodes pull the homelab's images from it
            report(names[0], f"registry: {self.registry.up()}")
        report(names[0], f"object store: {self.store.up(for_pods=any(real.values()))}")
        for name in names:
            report(name, "reconciling nodes")
            api = self.client(name)
            nodes = self.inventory.clusters[name].expanded_nodes()
            if not real[name] and self.real_nodes(name):
                self.real.stop(name)  # ran real before, fell back now: its kubelet must go
            changes = twin_nodes.reconcile(api, nodes, real=real[name])
            if real[name]:
                for done in self.real.up(name, api, report):
                    report(name, f"real node {done}")
            if not twin_nodes.wait_ready(api, timeout_s=_READY_TIMEOUT_S):
                raise TwinError(
                    f"twin cluster {name!r}: nodes not Ready after {_READY_TIMEOUT_S}s "
                    "(is its kwok-controller running? `homelab twin status`)"
                )
            report(name, f"ready ({changes})")

    def down(self, clusters: Iterable[str] | None = None, *, purge: bool = False) -> list[str]:
        """Stop the twin's clusters (``purge``: delete them and their data). Returns their names.

        Real nodes stop first; their host changes (addresses, bridges, mounts, cgroups,
        iptables chains, sysctls) are undone either way, their data kept unless ``purge``.
        The registry stops with the last cluster (every cluster selected); ``purge`` deletes
        its storage.
        """
        stopped = []
        names = self._select(clusters)
        with self._exclusive(names, lambda _c, _m: None):
            for name in names:
                self.real.stop(name, purge=purge)
                if not self._exists(name):
                    continue
                self._kwokctl("delete" if purge else "stop", "cluster", "--name", name)
                stopped.append(name)
            if set(names) == set(self.inventory.clusters):
                self.registry.stop(purge=purge)
                self.store.stop(purge=purge)
            if purge and not self._existing():
                shutil.rmtree(self.root, ignore_errors=True)
        return stopped

    @contextlib.contextmanager
    def _exclusive(self, names: list[str], report: Progress) -> Iterator[None]:
        """Hold the twin's lock (``<state dir>/twin.lock``, beside the twin's directory) while
        its clusters are started or stopped: a second process working on the same state
        (another `homelab up`, a test) waits for the first, and never starts a control plane
        twice or reads a half-written kubeconfig."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root.parent / "twin.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                for name in names:
                    report(name, "waiting for another process starting or stopping the twin")
                fcntl.flock(lock, fcntl.LOCK_EX)
            self._same_ports()
            yield

    def _same_ports(self) -> None:
        """Record the port base the twin starts with (``<twin>/port-base``); refuse another.

        Its real nodes' directories and the registry are found by their ports: a process with
        another base would not see them, start a second set, or delete the twin's directory
        under nodes still running.
        """
        record = self.root / "port-base"
        text = record.read_text().strip() if record.is_file() else ""
        if not text.isdigit():  # none yet (or unreadable): this process's base is the twin's
            if self.root.is_dir():
                record.write_text(f"{self.api_port_base}\n")
            return
        started = int(text)
        if started != self.api_port_base:
            raise TwinError(
                f"the twin in {self.root} was started with HOMELAB_TWIN_PORT_BASE={started}, "
                f"and this process uses {self.api_port_base}: its real nodes and registry would "
                f"not be found. Nothing was changed. Set HOMELAB_TWIN_PORT_BASE={started} "
                "(to stop it with `homelab twin down`, then change the port base)"
            )

    def status(self) -> list[ClusterStatus]:
        """Each inventory cluster: its server, whether it answers, its nodes and GPUs.

        A cluster's real nodes (those that ran here) are listed in ``real``, with their
        processes; ``message`` names a real node whose kubelet or containerd is down.
        """
        return [self._status(name) for name in self.inventory.clusters]

    def registry_status(self) -> RegistryStatus:
        """The twin's image registry: its address, whether it runs and answers."""
        return self.registry.status()

    def store_status(self) -> StoreStatus:
        """The twin's object store: its addresses, whether it runs and answers, its buckets."""
        return self.store.status()

    def real_nodes(self, cluster: str) -> list[twin_real.RealNodeSpec]:
        """The real nodes of ``cluster`` as this twin runs them (empty where they fell back)."""
        return [s for s in self.real.specs(cluster) if s.dir.is_dir()]

    def client(self, cluster: str) -> Any:
        """A Kubernetes API client for ``cluster``'s context (imported lazily: it is heavy)."""
        from kubernetes import config

        return config.new_client_from_config(
            config_file=str(self.kubeconfig), context=context_name(cluster)
        )

    # ------------------------------------------------------------------ one cluster

    def _up_one(self, name: str, report: Progress) -> None:
        if self._exists(name):
            if self._healthy(name):
                stopped = self._stopped_components(name)
                if not stopped:
                    report(name, "running")
                    return
                # kwokctl does not restart a component that exited; its start starts only
                # the stopped ones and leaves the API server (and its watchers) as they are.
                report(name, f"{', '.join(stopped)} not running: starting")
                self._kwokctl(
                    "start", "cluster", "--name", name, "--timeout", f"{_CREATE_TIMEOUT_S}s"
                )
                return
            report(name, "not answering: restarting")
            self._kwokctl("stop", "cluster", "--name", name, check=False)
            self._check_ports(name, wait_s=_PORTS_FREED_S)  # stopped processes exit async
            self._kwokctl("start", "cluster", "--name", name, "--timeout", f"{_CREATE_TIMEOUT_S}s")
            self._wait_healthy(name)
            return
        self._check_ports(name)
        report(name, f"creating on 127.0.0.1:{self.api_port(name)}")
        network = self.inventory.clusters[name].network
        self._kwokctl(
            *self.toolchain.kwokctl_create_args(name, self.root / f"kwokctl-{name}.kubeconfig")[1:],
            "--config",
            str(self._write_kwok_config(name)),
            "--extra-args",
            f"kube-apiserver=service-cluster-ip-range={network.service_cidr}",
            "--extra-args",
            f"kube-controller-manager=service-cluster-ip-range={network.service_cidr}",
            "--extra-args",
            f"kube-controller-manager=cluster-cidr={network.pod_cidr}",
            "--timeout",
            f"{_CREATE_TIMEOUT_S}s",
        )
        self._protect_secrets(name)

    def _protect_secrets(self, name: str) -> None:
        """kwokctl leaves the cluster's private keys readable by all (0644) and its kubeconfig
        by the group: make them the owner's only (0600), as every file holding a secret is."""
        cluster_dir = self.workdir / "clusters" / name
        for path in [*cluster_dir.glob("pki/*.key"), cluster_dir / "kubeconfig.yaml"]:
            if path.exists():
                path.chmod(0o600)

    def _status(self, name: str) -> ClusterStatus:
        server = f"https://127.0.0.1:{self.api_port(name)}"
        context = context_name(name)
        if not self._exists(name):
            return ClusterStatus(name, context, server, False, 0, 0, 0, "not created")
        real_here = bool(self.real_nodes(name))
        try:
            api = self.client(name)
            nodes = twin_nodes.observe(api)
        except _unreachable_errors() as exc:
            reason = type(exc).__name__
            real = tuple(self.real.status(name, None)) if real_here else ()
            return ClusterStatus(
                name, context, server, False, 0, 0, 0, f"not answering ({reason})", real
            )
        real = tuple(self.real.status(name, api)) if real_here else ()
        stopped = [
            f"{c} not running (homelab twin up starts it)" for c in self._stopped_components(name)
        ]
        return ClusterStatus(
            name,
            context,
            server,
            True,
            len(nodes),
            sum(1 for n in nodes if n.ready),
            sum(n.gpus for n in nodes),
            "; ".join([*stopped, *(f"real node {r.name}: {r.message}" for r in real if r.message)]),
            real,
        )

    # ------------------------------------------------------------------ real nodes

    def _real_plan(self, names: list[str], report: Progress) -> dict[str, set[str]]:
        """Per cluster, the nodes that run real now; records (and says once) what fell back."""
        wanted = {n: {x.name for x in twin_real.real_nodes_of(self.inventory, n)} for n in names}
        reason = twin_real.unavailable(self.toolchain) if any(wanted.values()) else None
        plan: dict[str, set[str]] = {}
        fell: list[str] = []
        reasons: list[str] = []
        for name in names:
            if not wanted[name]:
                plan[name] = set()
                continue
            why = reason or self._cluster_lacks_real_support(name)
            plan[name] = set() if why else wanted[name]
            if why:
                fell += sorted(wanted[name])
                if why not in reasons:
                    reasons.append(why)
        if not fell:
            self.real_fallback = None
            return plan
        fallback = RealNodesUnavailable(fell, "; ".join(reasons))
        if self.real_fallback is None or str(self.real_fallback) != str(fallback):
            _log.warning("%s", fallback)  # once per twin and reason, not on every up
            for name in names:
                if wanted[name] and not plan[name]:
                    report(name, f"real nodes run as KWOK nodes: {fallback.reason}")
        self.real_fallback = fallback
        return plan

    def _cluster_lacks_real_support(self, name: str) -> str | None:
        """Why ``name``'s control plane cannot take a real node (made before they existed)."""
        saved = self.workdir / "clusters" / name / "kwok.yaml"
        try:
            text = saved.read_text()
        except OSError:
            return None
        if "manage-nodes-with-annotation-selector" not in text:
            return (
                f"cluster {name!r} was created before the twin had real nodes (its KWOK "
                f"controller manages every node): recreate it with `homelab twin down --purge "
                f"{name}` and `homelab twin up {name}`"
            )
        return None

    def _kubelet_credentials(self, name: str) -> dict[str, Any]:
        """The cluster's CA file and a kubeconfig for a real node's kubelet (admin access)."""
        cluster_dir = self.workdir / "clusters" / name
        config = yaml.safe_load((cluster_dir / "kubeconfig.yaml").read_text())
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{self.api_port(name)}"
        return {"ca_file": str(cluster_dir / "pki" / "ca.crt"), "kubeconfig": config}

    def _wait_healthy(self, name: str) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not self._healthy(name):
            if time.monotonic() > deadline:
                raise TwinError(
                    f"twin cluster {name!r}: the API server did not answer within "
                    f"{_READY_TIMEOUT_S}s of starting (logs: kwokctl logs kube-apiserver "
                    f"--name {name}, with KWOK_WORKDIR={self.workdir})"
                )
            time.sleep(0.5)

    def _stopped_components(self, name: str) -> list[str]:
        """The components of ``name`` that kwokctl finds not running (``get components``)."""
        listed = self._kwokctl(
            "get", "components", "--name", name, "-o", "wide"
        ).stdout.splitlines()
        rows = [line.split() for line in listed[1:]]  # under the NAME STATUS header
        return [row[0] for row in rows if row[1:] == ["Stopped"]]

    def _healthy(self, name: str) -> bool:
        if not self.kubeconfig.exists():
            return False
        from kubernetes import client

        try:
            client.VersionApi(self.client(name)).get_code(_request_timeout=5)
        except _unreachable_errors():
            return False
        return True

    def _check_ports(self, name: str, *, wait_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_s
        for option, port in self.ports(name).items():
            while not _bindable(port) and time.monotonic() < deadline:
                time.sleep(0.25)
            if not _bindable(port):
                what = option.removesuffix("Port")
                raise PortInUseError(
                    f"twin cluster {name!r} needs 127.0.0.1:{port} (its {what}), but "
                    f"another process holds it{_holder(port)}; stop it, or choose other "
                    "ports with HOMELAB_TWIN_PORT_BASE"
                )

    # ------------------------------------------------------------------ kwokctl

    def _kwokctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env(), "KWOK_WORKDIR": str(self.workdir)}
        cmd = [str(self.toolchain.kwokctl), *args]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
            raise TwinError(
                f"kwokctl {' '.join(args[:3])} failed (exit {result.returncode}):\n{tail}"
            )
        return result

    def _write_kwok_config(self, name: str) -> Path:
        """kwokctl's configuration for ``name``: loopback only, the cluster's ports, and what
        real nodes need (kwokctl 0.8.0 panics on ``--extra-args`` in some positions, so these
        go through ``componentsPatches``)."""
        pki = self.workdir / "clusters" / name / "pki"

        def args(**values: str) -> list[dict[str, str]]:
            return [{"key": k.replace("_", "-"), "value": v} for k, v in values.items()]

        config = {
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
            "kind": "KwokctlConfiguration",
            "options": {"bindAddress": "127.0.0.1", **self.ports(name)},
            "componentsPatches": [
                {
                    "name": "kwok-controller",
                    "extraArgs": args(
                        manage_all_nodes="false",
                        manage_nodes_with_annotation_selector=_FAKE_SELECTOR,
                    ),
                },
                {
                    "name": "kube-apiserver",
                    "extraArgs": args(
                        kubelet_preferred_address_types="InternalIP,Hostname",
                        kubelet_client_certificate=str(pki / "admin.crt"),
                        kubelet_client_key=str(pki / "admin.key"),
                    ),
                },
                # One controller-manager and one scheduler per cluster, so no leader election:
                # with it (the default), a lease not renewed within 10 s on a loaded machine
                # makes the process exit for good ("leaderelection lost"). Seen in CI: Air's
                # token controller gone, a mesh link's token never filled.
                {"name": "kube-controller-manager", "extraArgs": args(leader_elect="false")},
                {"name": "kube-scheduler", "extraArgs": args(leader_elect="false")},
            ],
        }
        path = self.root / f"kwokctl-{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _exists(self, name: str) -> bool:
        return (self.workdir / "clusters" / name).is_dir()

    def _existing(self) -> list[str]:
        clusters = self.workdir / "clusters"
        return sorted(p.name for p in clusters.iterdir()) if clusters.is_dir() else []

    def _select(self, clusters: Iterable[str] | None) -> list[str]:
        names = list(self.inventory.clusters) if clusters is None else list(clusters)
        unknown = [n for n in names if n not in self.inventory.clusters]
        if unknown:
            raise TwinError(f"unknown cluster(s) {', '.join(unknown)} (not in the inventory)")
        return names

    def _write_kubeconfig(self) -> None:
        """One kubeconfig, one ``twin-<cluster>`` context per cluster kwokctl made."""
        merged: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [],
            "users": [],
            "contexts": [],
            "current-context": "",
        }
        for name in self._existing():
            source = self.workdir / "clusters" / name / "kubeconfig.yaml"
            if not source.exists():
                continue
            config = yaml.safe_load(source.read_text())
            context = context_name(name)
            cluster = config["clusters"][0]["cluster"]
            cluster["server"] = f"https://127.0.0.1:{self.api_port(name)}"
            merged["clusters"].append({"name": context, "cluster": cluster})
            merged["users"].append({"name": context, "user": config["users"][0]["user"]})
            merged["contexts"].append(
                {"name": context, "context": {"cluster": context, "user": context}}
            )
        if merged["contexts"]:
            merged["current-context"] = merged["contexts"][0]["name"]
        # Written beside it, then renamed over it: a process reading the kubeconfig at the
        # same time (another `homelab up` on the same state) sees the old file or the new one,
        # never a half-written one.
        fd, partial = tempfile.mkstemp(dir=self.kubeconfig.parent, prefix=".kubeconfig-")
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp makes it 0600
                yaml.safe_dump(merged, f)
            os.replace(partial, self.kubeconfig)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise


def _bindable(port: int) -> bool:
    """Whether a listener could bind 127.0.0.1:``port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@functools.cache
def _unreachable_errors() -> tuple[type[Exception], ...]:
    """What the Kubernetes client raises when an API server does not answer."""
    import urllib3
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    return (ApiException, ConfigException, urllib3.exceptions.HTTPError, OSError)


def _holder(port: int) -> str:
    """`` (pid N: name)`` of the process listening on ``port``, when it can be found."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN" and conn.pid:
                return f" (pid {conn.pid}: {psutil.Process(conn.pid).name()})"
    except Exception:  # finding the holder is a courtesy; the error stands without it
        return ""
    return ""
