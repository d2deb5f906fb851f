"""The twin's vLLM server: time to ready, time to first token, tokens per second, check overhead.

Against a running twin whose ``vllm_endpoint/<endpoint>`` serves (``homelab up``, or the slow
test's steps), with the environment of that twin (``HOMELAB_STATE_DIR``,
``HOMELAB_TWIN_PORT_BASE``):

- **time to ready**: the server's pod deleted, seconds until the Deployment's new pod is Ready
  (vLLM's CPU build loading the weights in a pod on the real node);
- **TTFT and tokens/s**: the fixed prompt set of the checks (``assets.endpoints.SAMPLE_PROMPTS``),
  16 tokens each, streamed, ``--repeat`` times, straight to the pod's address (the twin's pod
  network is on this machine);
- **check overhead**: the checks' requests (models, the five completions, a chat) through the
  API server's port-forward, as the asset makes them, against the same requests straight to
  the pod: the ratio is what the port-forward and the client cost.

    uv run python benchmarks/vllm_serve.py [--endpoint sre-agent] [--repeat 3] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assets.endpoints import SAMPLE_PROMPTS
from homelab_dagster.loader import load_inventory
from homelab_dagster.settings import Settings
from infra.endpoint import SERVER_PORT, endpoint_labels
from resources.deployment import build_deployment
from resources.vllm import ServerClient, VllmServers

_TOKENS = 16


def _ready_pod(core, namespace: str, selector: str, not_named: str = "", timeout: float = 1800):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
            ready = any(
                c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
            )
            if ready and pod.metadata.name != not_named and not pod.metadata.deletion_timestamp:
                return pod
        time.sleep(0.5)
    raise SystemExit(f"no Ready pod for {selector} after {timeout:.0f} s")


def _check_requests(client: ServerClient, model: str) -> float:
    """The asset's check requests, timed."""
    start = time.perf_counter()
    client.models()
    for prompt in SAMPLE_PROMPTS:
        client.complete(model, prompt, _TOKENS)
    client.chat(model, SAMPLE_PROMPTS[0], _TOKENS)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="sre-agent")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from kubernetes import client as k8s

    settings = Settings.from_env()
    inventory = load_inventory(settings.inventory_path).inventory
    endpoint = inventory.endpoints[args.endpoint]
    resources = build_deployment(settings, inventory).resources
    kubernetes = resources["kubernetes"]
    vllm: VllmServers = resources["vllm"]  # type: ignore[assignment]
    core = k8s.CoreV1Api(kubernetes.api_client(endpoint.cluster))
    selector = ",".join(f"{k}={v}" for k, v in endpoint_labels(args.endpoint).items())
    model = endpoint.served_model_name(args.endpoint)

    pod = _ready_pod(core, endpoint.namespace, selector)
    start = time.monotonic()
    core.delete_namespaced_pod(pod.metadata.name, endpoint.namespace, grace_period_seconds=0)
    pod = _ready_pod(core, endpoint.namespace, selector, not_named=pod.metadata.name)
    time_to_ready = time.monotonic() - start

    direct = vllm.client(f"http://{pod.status.pod_ip}:{SERVER_PORT}/v1")
    direct.complete(model, SAMPLE_PROMPTS[0], _TOKENS)  # the first request warms the engine
    answers = [
        direct.complete(model, p, _TOKENS) for _ in range(args.repeat) for p in SAMPLE_PROMPTS
    ]
    direct_s = [_check_requests(direct, model) for _ in range(args.repeat)]
    with vllm.connect(kubernetes, endpoint.cluster, endpoint.namespace, pod.metadata.name) as pf:
        forwarded_s = [_check_requests(pf, model) for _ in range(args.repeat)]

    ttft = [a.first_token_s * 1000 for a in answers]
    report = {
        "endpoint": args.endpoint,
        "pod": pod.metadata.name,
        "node": pod.spec.node_name,
        "time_to_ready_s": round(time_to_ready, 1),
        "ttft_ms_median": round(statistics.median(ttft), 1),
        "latency_ms_median": round(statistics.median(a.latency_s * 1000 for a in answers), 1),
        "tokens_per_s_median": round(statistics.median(a.tokens_per_s for a in answers), 1),
        "checks_direct_s_median": round(statistics.median(direct_s), 3),
        "checks_port_forward_s_median": round(statistics.median(forwarded_s), 3),
        "check_overhead_ratio": round(
            statistics.median(forwarded_s) / statistics.median(direct_s), 2
        ),
        "requests": len(answers),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
