"""An endpoint's time to ready with its weights copied from the store (the copy step) against
the ``hostPath`` mount it replaced, same machine, same run.

Against a running twin whose ``vllm_endpoint/<endpoint>`` serves (``make up``), with that
twin's environment (``HOMELAB_STATE_DIR``, ``HOMELAB_TWIN_PORT_BASE``). Two bare pods of the
endpoint's own pod spec (``infra.endpoint.pod_spec``, the runtime of this deployment), on the
endpoint's node, one at a time, alternating:

- **store**: as deployed: the init container copies the current version from the bucket,
  verifying it, then vLLM loads it from the ``emptyDir``;
- **hostPath**: the version copied once beforehand to a directory of this machine and mounted
  read-only by ``hostPath`` (what the twin did before), no init container.

Time to ready is the pod's Ready condition's time less its creation time, both by the API
server's clock. Target: the store at most 10 s more than ``hostPath`` (medians).

    uv run python benchmarks/weights_serving.py [--endpoint sre-agent] [--repeat 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import save

from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings
from infra.endpoint import ServedWeights, pod_spec
from resources.deployment import build_deployment
from resources.vllm import VllmServers
from resources.weights import WeightsStore, version_prefix
from resources.weights_copy import copy_version


def _ready_seconds(core, namespace: str, name: str, timeout: float = 1800) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pod = core.read_namespaced_pod(name, namespace)
        ready = [c for c in pod.status.conditions or [] if c.type == "Ready"]
        if ready and ready[0].status == "True":
            return (ready[0].last_transition_time - pod.metadata.creation_timestamp).total_seconds()
        for status in pod.status.init_container_statuses or []:
            ended = status.state.terminated
            if ended and ended.exit_code:
                raise SystemExit(f"{name}: copy step failed: {ended.message}")
        time.sleep(0.5)
    raise SystemExit(f"{name} not Ready after {timeout:.0f} s")


def _run(core, namespace: str, name: str, spec: dict) -> float:
    from kubernetes import client as k8s

    body = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, labels={"homelab.dev/benchmark": "weights"}),
        spec=spec,
    )
    core.create_namespaced_pod(namespace, body)
    try:
        return _ready_seconds(core, namespace, name)
    finally:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        while core.list_namespaced_pod(namespace, field_selector=f"metadata.name={name}").items:
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="sre-agent")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from kubernetes import client as k8s

    settings = Settings.from_env()
    inventory = load_inventory(settings.inventory_path).inventory
    endpoint = inventory.endpoints[args.endpoint]
    resources = build_deployment(settings, inventory).resources
    store: WeightsStore = resources["weights_store"]  # type: ignore[assignment]
    vllm: VllmServers = resources["vllm"]  # type: ignore[assignment]
    version = store.current(endpoint.model)
    if version is None:
        raise SystemExit(f"{endpoint.model} has no current version: `make up` first")
    weights = ServedWeights(version.digest, version_prefix(endpoint.model, version.digest))
    cluster = inventory.clusters[endpoint.cluster]
    from_store = pod_spec(args.endpoint, endpoint, cluster, weights, vllm.runtime())
    local = Path(tempfile.mkdtemp(prefix="bench-hostpath-")) / version.digest
    copy_version(store.store, weights.relative_path, local)
    by_host = copy.deepcopy(from_store)
    by_host["initContainers"] = []
    for volume in by_host["volumes"]:
        if volume["name"] == "weights":
            volume.pop("emptyDir")
            volume["hostPath"] = {"path": str(local), "type": "Directory"}
    core = k8s.CoreV1Api(resources["kubernetes"].api_client(endpoint.cluster))  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {"store": [], "hostPath": []}
    for i in range(args.repeat):
        times["hostPath"].append(_run(core, endpoint.namespace, f"bench-hostpath-{i}", by_host))
        times["store"].append(_run(core, endpoint.namespace, f"bench-store-{i}", from_store))
        last = {k: v[-1] for k, v in times.items()}
        print(f"round {i + 1}: hostPath {last['hostPath']:.0f} s, store {last['store']:.0f} s")
    median = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "endpoint": args.endpoint,
        "weights_mb": round(version.size_bytes / 2**20, 1),
        "repeat": args.repeat,
        "seconds": times,
        "median_s": median,
        "store_minus_hostpath_s": round(median["store"] - median["hostPath"], 1),
        "target": "store at most 10 s more than hostPath",
    }
    save("weights_serving", report)
    return 0 if report["store_minus_hostpath_s"] <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
