"""The twin's cost: time to bring all clusters up, and the memory they hold.

Measures, in one run, with a cached toolchain and a fresh state directory:
  - create: ``Twin.up()`` of every inventory cluster from nothing;
  - noop:   ``Twin.up()`` again while everything runs (the idempotent path);
  - start:  ``Twin.up()`` after ``down()`` (stopped clusters started again, data kept);
  - rss:    resident memory of every process of the twin, summed;
  - real:   for each real node (``twin: real``), seconds from starting its kubelet to Ready,
            seconds for a pod of a locally imported image to be Running on it, and the RSS
            of its kubelet and containerd (skipped, with the reason, where real nodes fall back);
  - images: what ``homelab twin up`` spends on the images the inventory's pods pull
            (``ensure_images``), first into the fresh twin's empty registry (pushed from the
            build cache; built first where it lacks them), then again with nothing changed.
Targets (issue: the twin): all five up in under 60 s warm, under 3 GiB resident together;
(issue: real pods) under 3.5 GiB with the real nodes, a real node Ready under 5 s after its
kubelet starts, a pod from a cached image Running under 5 s; (issue: a twin started any way
has its images) a second ``up`` with nothing changed spends under 5 s on images.

    uv run python benchmarks/twin_up.py [--port-base 24443]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from homelab_dagster.cli.twin import ensure_images  # noqa: E402
from homelab_dagster.loader import load_inventory  # noqa: E402
from homelab_dagster.twin import Twin  # noqa: E402
from infra.toolchain import ensure_toolchain  # noqa: E402


def _rss(workdir: Path) -> tuple[int, int]:
    """(processes, bytes) of every process whose command line names ``workdir``."""
    count = total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(workdir) in cmdline and proc.info["memory_info"]:
            count += 1
            total += proc.info["memory_info"].rss
    return count, total


def _real_node_costs(twin: Twin, kubelet_ready: dict[str, float]) -> None:
    """Pod start on each real node, and its kubelet's and containerd's memory."""
    import shutil

    from kubernetes import client

    from homelab_dagster.images import oci_archive

    busybox = shutil.which("busybox") or "/bin/busybox"
    image = "homelab.twin/busybox:1.35"
    archive = oci_archive(image, {"bin/busybox": Path(busybox), "bin/sh": "->busybox"}, cmd=["sh"])
    for cluster in twin.inventory.clusters:
        for spec in twin.real_nodes(cluster):
            if image not in twin.real.images(spec):
                twin.real.import_image(spec, archive)
            core = client.CoreV1Api(twin.client(cluster))
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "bench"},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": spec.name},
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 0,
                    "containers": [
                        {
                            "name": "c",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "command": ["sh", "-c", "exec sleep 3600"],
                        }
                    ],
                },
            }
            while not core.list_namespaced_service_account("default").items:
                time.sleep(0.2)  # a new cluster's controller-manager makes it
            start = time.perf_counter()
            core.create_namespaced_pod("default", pod)
            while core.read_namespaced_pod("bench", "default").status.phase != "Running":
                time.sleep(0.1)
            running = time.perf_counter() - start
            procs = {}
            for what in ("kubelet", "containerd"):
                pid = int(spec.path("pids", f"{what}.pid").read_text())
                procs[what] = psutil.Process(pid).memory_info().rss / 2**20
            core.delete_namespaced_pod("bench", "default", grace_period_seconds=0)
            ready = kubelet_ready.get(spec.name)
            print(
                f"real {spec.name}: Ready {ready:.1f} s after its kubelet started; "
                f"pod Running in {running:.1f} s; kubelet {procs['kubelet']:.0f} MiB, "
                f"containerd {procs['containerd']:.0f} MiB"
                if ready is not None
                else f"real {spec.name}: pod Running in {running:.1f} s"
            )


def _timed(label: str, fn) -> float:
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    print(f"{label:<8} {elapsed:6.1f} s")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-base", type=int, default=24443)
    options = parser.parse_args()
    inventory = load_inventory(ROOT / "homelab.yaml").inventory
    toolchain = ensure_toolchain(build=False)
    with tempfile.TemporaryDirectory() as state:
        twin = Twin(inventory, Path(state), toolchain, api_port_base=options.port_base)
        started: dict[str, float] = {}
        kubelet_ready: dict[str, float] = {}

        def progress(_cluster: str, message: str) -> None:
            node = message.split(":")[0]
            if message.endswith("starting the kubelet"):
                started[node] = time.perf_counter()
            elif message.startswith("real node ") and "kubelet started" in message:
                node = message.removeprefix("real node ").split(":")[0]
                kubelet_ready[node] = time.perf_counter() - started.get(node, 0.0)

        try:
            create = _timed("create", lambda: twin.up(progress=progress))
            time.sleep(5)  # let the control planes settle before reading memory
            processes, rss = _rss(twin.workdir)
            real_processes, real_rss = _rss(twin.root / "real")
            processes, rss = processes + real_processes, rss + real_rss
            if twin.real_fallback:
                print(f"real nodes: skipped: {twin.real_fallback}")
            else:
                _real_node_costs(twin, kubelet_ready)
                said = lambda name, message: print(f"  image {name}: {message}")  # noqa: E731
                pushed = _timed("images", lambda: ensure_images(twin, None, said))
                unchanged = _timed("images=", lambda: ensure_images(twin, None, said))
                print(
                    f"images: into an empty registry {pushed:.1f} s, unchanged "
                    f"{unchanged:.2f} s ({unchanged / pushed:.3f}x; target under 5 s)"
                )
            noop = _timed("noop", twin.up)
            twin.down()
            start = _timed("start", lambda: twin.up(progress=progress))
        finally:
            twin.down(purge=True)
    clusters = len(inventory.clusters)
    print(
        f"clusters {clusters}, processes {processes}, rss {rss / 2**30:.2f} GiB "
        f"({rss / 2**20 / clusters:.0f} MiB per cluster)"
    )
    print(
        f"targets: create {create:.1f} s and start {start:.1f} s vs 60 s; "
        f"rss {rss / 2**30:.2f} GiB vs 3 GiB (3.5 GiB with real nodes); noop {noop:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
