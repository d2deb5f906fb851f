"""What an endpoint may declare, what its program deploys, and the rules its checks apply.

Fast: no twin. The inventory rules are broken by one change to the shipped homelab.yaml each;
the program's pod is read from :func:`infra.endpoint.pod_spec` (what the Deployment carries);
the serving rules are :mod:`homelab_dagster.serving`'s functions.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from _cli_support import validate

from homelab_dagster import serving
from homelab_dagster.errors import InventoryError
from homelab_dagster.loader import load_inventory, parse_inventory
from homelab_dagster.rules import CPU_HEAD_SIZES
from infra.endpoint import (
    CHAT_TEMPLATE_PATH,
    GPU_RESOURCE,
    ServedWeights,
    ServerRuntime,
    StoreKeys,
    WeightsSource,
    pod_spec,
    served_names,
)


def problems_of(text: str) -> list[str]:
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, "homelab.yaml")
    return [str(p) for p in info.value.problems]


# ----------------------------------------------------------------------------- inventory


def test_the_shipped_sre_agent_has_a_head_width_the_cpu_runtime_serves(project_root):
    inventory = load_inventory(project_root / "homelab.yaml").inventory
    arch = inventory.models["sre-agent"].architecture
    assert arch is not None
    assert arch.n_embd // arch.n_head in CPU_HEAD_SIZES
    endpoint = inventory.endpoints["sre-agent"]
    assert endpoint.max_model_len <= arch.n_positions
    assert endpoint.chat_template


def test_endpoints_that_together_ask_more_gpus_than_their_nodes_have_are_refused(
    inventory_text,
):
    """forge-inference has 2 GPUs and the 70B endpoint takes both: a second GPU endpoint
    there would stay Pending forever on the homelab."""

    def edit(data):
        data["endpoints"]["sre-agent"]["accelerator"] = "gpu"

    (problem,) = problems_of(inventory_text(edit))
    assert ".tensor_parallel_size: the endpoints on 'forge''s 'inference' nodes" in problem
    assert "ask 3 GPUs" in problem and "vllm 2" in problem and "sre-agent 1" in problem
    assert "have 2" in problem


def test_a_cpu_endpoint_holds_no_gpu_and_runs_one_process(inventory_text, project_root):
    inventory = load_inventory(project_root / "homelab.yaml").inventory
    cpu = inventory.endpoints["sre-agent"]
    assert cpu.accelerator == "cpu" and cpu.gpus == 0
    assert inventory.endpoints["vllm"].gpus == 2

    def edit(data):
        data["endpoints"]["sre-agent"]["tensor_parallel_size"] = 2

    (problem,) = problems_of(inventory_text(edit))
    assert "tensor-parallel size must be 1" in problem


def test_a_head_width_of_16_is_refused_with_the_supported_widths(inventory_text):
    def edit(data):
        data["models"]["sre-agent"]["architecture"]["n_head"] = 4  # 64 / 4 = 16

    (problem,) = problems_of(inventory_text(edit))
    assert "models.sre-agent.architecture.n_head" in problem
    assert "n_embd 64 / n_head 4 = 16" in problem
    assert "32, 64, 80" in problem and "endpoint 'sre-agent'" in problem
    assert "n_head 2 -> 32" in problem  # what would fit


def test_max_model_len_above_the_models_positions_is_refused(inventory_text):
    def edit(data):
        data["endpoints"]["sre-agent"]["max_model_len"] = 256

    (problem,) = problems_of(inventory_text(edit))
    assert "endpoints.sre-agent.max_model_len" in problem
    assert "max_model_len 256 exceeds the 128 positions" in problem


def test_tensor_parallelism_above_the_nodes_gpus_is_refused_by_validate(inventory_text, tmp_path):
    def edit(data):
        data["endpoints"]["vllm"]["tensor_parallel_size"] = 4

    path = tmp_path / "homelab.yaml"
    path.write_text(inventory_text(edit))
    status, out = validate(path)
    assert status == 1, out
    assert "endpoints.vllm.tensor_parallel_size" in out
    assert "tensor-parallel size 4 exceeds the GPUs" in out and "forge-inference, has 2" in out


# ----------------------------------------------------------------------------- program


def _sre_agent(shipped_inventory):
    return (
        shipped_inventory.endpoints["sre-agent"],
        shipped_inventory.clusters["forge"],
    )


DIGEST = "ab" * 32


def test_the_twin_pod_copies_the_version_in_first_asks_no_gpu_on_cpu_and_runs_on_inference(
    shipped_inventory,
):
    endpoint, forge = _sre_agent(shipped_inventory)
    runtime = ServerRuntime(
        image="ghcr.io/homelab/vllm-cpu:0.32.0",
        args=("--enforce-eager", "--dtype", "float32"),
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        memory="4Gi",
        weights=WeightsSource(
            bucket_url="s3://ml-models",
            endpoint_url="http://198.18.66.211:16485",
            copy_image="ghcr.io/homelab/homelab-dagster:0.1.0",
            keys=StoreKeys("AKIATWIN", "twin-secret"),
        ),
    )
    weights = ServedWeights(DIGEST, f"sre-agent/versions/{DIGEST}")
    spec = pod_spec("sre-agent", endpoint, forge, weights, runtime)
    (container,) = spec["containers"]
    assert spec["nodeSelector"] == {"role": "inference"}
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    # The shipped sre-agent is served on CPU (forge-inference's GPUs are the 70B's).
    assert GPU_RESOURCE not in container["resources"]["limits"]
    assert GPU_RESOURCE not in container["resources"]["requests"]
    assert container["image"] == "ghcr.io/homelab/vllm-cpu:0.32.0"
    # No hostPath anywhere: the copy step fills an emptyDir, verified, before the server starts.
    assert {"name": "weights", "emptyDir": {}} in spec["volumes"]
    assert not any("hostPath" in v for v in spec["volumes"])
    (copy,) = spec["initContainers"]
    assert copy["image"] == "ghcr.io/homelab/homelab-dagster:0.1.0"
    assert copy["command"] == [
        "python",
        "-m",
        "resources.weights_copy",
        "--endpoint-url",
        "http://198.18.66.211:16485",
        f"s3://ml-models/sre-agent/versions/{DIGEST}",
        f"/models/{DIGEST}",
    ]
    assert copy["envFrom"] == [{"secretRef": {"name": "sre-agent-weights-store"}}]
    assert copy["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert "twin-secret" not in repr(runtime)  # the keys never print
    mount = next(m for m in container["volumeMounts"] if m["name"] == "weights")
    assert mount == {"name": "weights", "mountPath": f"/models/{DIGEST}", "readOnly": True}
    command = container["command"]
    assert command[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    names = command[command.index("--served-model-name") + 1 :][:2]
    assert (
        names
        == served_names("sre-agent", endpoint, DIGEST)
        == [
            "sre-agent",
            f"sre-agent@{DIGEST[:12]}",
        ]
    )
    assert command[command.index("--max-model-len") + 1] == "128"
    assert command[command.index("--chat-template") + 1] == CHAT_TEMPLATE_PATH
    assert "--enforce-eager" in command
    assert container["startupProbe"]["failureThreshold"] * 10 >= 600  # model loading
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_the_homelab_pod_fetches_the_version_from_the_bucket_and_tolerates_node_taints(
    shipped_inventory, inventory_text
):
    def edit(data):
        pool = data["clusters"]["forge"]["nodes"][4]  # forge-inference
        pool["taints"] = [{"key": "dedicated", "value": "inference", "effect": "NoSchedule"}]

    inventory = parse_inventory(inventory_text(edit), "homelab.yaml")
    endpoint = inventory.endpoints["vllm"]
    weights = ServedWeights(DIGEST, f"llama/versions/{DIGEST}")
    runtime = ServerRuntime(
        weights=WeightsSource(bucket_url="s3://ml-models", endpoint_url="http://minio:9000")
    )
    spec = pod_spec("vllm", endpoint, inventory.clusters["forge"], weights, runtime)
    (init,) = spec["initContainers"]
    assert init["command"][-2:] == [f"s3://ml-models/llama/versions/{DIGEST}", f"/models/{DIGEST}"]
    assert {"name": "weights", "emptyDir": {}} in spec["volumes"]
    assert {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    (container,) = spec["containers"]
    assert container["image"] == endpoint.image == "vllm/vllm-openai:v0.33.0"
    assert container["resources"]["limits"] == {GPU_RESOURCE: "2"}
    command = container["command"]
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert "--chat-template" not in command
    # The endpoint named vllm has a Service named vllm: its VLLM_PORT=tcp://... variable
    # would be read by vLLM as its own port setting (a crash seen on the twin).
    assert spec["enableServiceLinks"] is False


def test_a_model_the_store_does_not_hold_is_served_by_its_hub_id_with_no_weights_mount(
    shipped_inventory,
):
    """The shipped 70B endpoint on the twin (its weights are not in the store): no weights
    volume, so no mount of one (`make up` once failed here: "volumeMounts[1].name: Not found:
    weights"); every mount names a volume of the pod."""
    endpoint = shipped_inventory.endpoints["vllm"]
    hub_id = shipped_inventory.models[endpoint.model].base_model
    assert hub_id == "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"  # 4 bits: it fits
    weights = ServedWeights(None, model_id=hub_id)
    for source in (WeightsSource(), WeightsSource(bucket_url="s3://m")):
        runtime = ServerRuntime(weights=source)
        spec = pod_spec("vllm", endpoint, shipped_inventory.clusters["forge"], weights, runtime)
        (container,) = spec["containers"]
        volumes = {v["name"] for v in spec["volumes"]}
        assert {m["name"] for m in container["volumeMounts"]} <= volumes
        assert "weights" not in volumes and spec["initContainers"] == []
        command = container["command"]
        assert command[command.index("--model") + 1] == hub_id


# ----------------------------------------------------------------------------- serving rules


def _pod(**fields):
    base = {
        "name": "sre-agent-1",
        "digest": DIGEST,
        "node": "forge-inference",
        "phase": "Running",
        "ready": False,
    }
    return serving.ObservedPod(**{**base, **fields})


def test_a_pod_the_scheduler_refuses_fails_the_rollout_in_its_words():
    message = "0/8 nodes are available: 1 Insufficient nvidia.com/gpu."
    pod = _pod(node=None, phase="Pending", unschedulable=message)
    rollout = serving.rollout_state([pod], DIGEST)
    assert rollout.state == "failed"
    assert "cannot place pod sre-agent-1: 0/8 nodes are available: 1 Insufficient" in (
        rollout.reason
    )


def test_a_crashed_server_fails_the_rollout_a_ready_one_serves_others_are_ignored():
    crashed = _pod(restarts=1, waiting="CrashLoopBackOff: back-off", terminated="exit code 1")
    assert serving.rollout_state([crashed], DIGEST).state == "failed"
    old = _pod(name="old", digest="cd" * 32, ready=True)
    assert serving.rollout_state([old], DIGEST).state == "waiting"
    ready = serving.rollout_state([old, _pod(ready=True)], DIGEST)
    assert ready.state == "serving" and ready.pod and ready.pod.name == "sre-agent-1"
    pulling = _pod(waiting="ImagePullBackOff: Back-off pulling image ghcr.io/homelab/vllm-cpu")
    refused = serving.rollout_state([pulling], DIGEST)
    assert refused.state == "failed" and "cannot pull its image" in refused.reason
    placed = serving.rollout_state([_pod()], DIGEST, scheduled_is_enough=True)
    assert placed.state == "serving" and "placed on forge-inference" in placed.reason


def test_a_restart_forgiven_is_awaited_the_next_crash_fails():
    # The engine killed by a signal once: the kubelet's restart (and its back-off) is awaited.
    once = _pod(restarts=1, waiting="CrashLoopBackOff: back-off 10s", terminated="exit code 0")
    assert serving.rollout_state([once], DIGEST, restarts_forgiven={"sre-agent-1": 1}).state == (
        "waiting"
    )
    restarted = _pod(restarts=1, ready=True)
    served = serving.rollout_state([restarted], DIGEST, restarts_forgiven={"sre-agent-1": 1})
    assert served.state == "serving"
    twice = _pod(restarts=2, terminated="exit code 0 (Completed)")
    again = serving.rollout_state([twice], DIGEST, restarts_forgiven={"sre-agent-1": 1})
    assert again.state == "failed" and "crashed" in again.reason
    # Forgiven for one pod only: another pod's crash still fails the rollout.
    other = _pod(name="sre-agent-2", restarts=1, terminated="exit code 1")
    assert serving.rollout_state([other], DIGEST, restarts_forgiven={"sre-agent-1": 1}).state == (
        "failed"
    )


def test_only_a_death_by_signal_is_the_nodes_fault():
    killed = serving.crash_cause("WARNING [shutdown] MPClient: engine core exited unexpectedly")
    assert serving.killed_by_signal(killed)
    own = serving.crash_cause("ERROR ValueError: head size 16 is not supported\n")
    assert not serving.killed_by_signal(own) and own.startswith("ValueError: head size 16")
    # An engine that failed with an error of its own, then exited: not the node's fault.
    both = serving.crash_cause(
        "ERROR RuntimeError: CPU attention does not support head size 16\n"
        "WARNING [shutdown] MPClient: engine core exited unexpectedly; starting cleanup\n"
    )
    assert not serving.killed_by_signal(both), both


def test_observed_pod_reads_the_schedulers_refusal_from_a_client_pod():
    from datetime import UTC, datetime, timedelta

    from kubernetes import client

    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(
            name="p",
            annotations={"homelab.dev/weights-digest": DIGEST},
            creation_timestamp=datetime.now(UTC) - timedelta(seconds=90),
        ),
        spec=client.V1PodSpec(containers=[], node_name=None),
        status=client.V1PodStatus(
            phase="Pending",
            conditions=[
                client.V1PodCondition(
                    type="PodScheduled", status="False", reason="Unschedulable", message="no GPUs"
                )
            ],
        ),
    )
    observed = serving.observed_pod(pod)
    assert observed.unschedulable == "no GPUs" and observed.digest == DIGEST
    assert not observed.ready and not observed.deleting
    assert 89 <= observed.age_s < 120  # the API server's clock: what a stuck step is timed by


def test_a_failed_copy_step_fails_the_rollout_with_what_it_said():
    """The init container's termination message (its last line: the file that did not
    verify) is the rollout's reason; the server never started."""
    from kubernetes import client

    said = "weights copy failed: model.safetensors of version abababababab has sha256 ..."
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="p", annotations={"homelab.dev/weights-digest": DIGEST}),
        spec=client.V1PodSpec(containers=[], node_name="forge-inference"),
        status=client.V1PodStatus(
            phase="Pending",
            init_container_statuses=[
                client.V1ContainerStatus(
                    name="fetch-weights",
                    image="i",
                    image_id="",
                    ready=False,
                    restart_count=1,
                    state=client.V1ContainerState(
                        waiting=client.V1ContainerStateWaiting(reason="CrashLoopBackOff")
                    ),
                    last_state=client.V1ContainerState(
                        terminated=client.V1ContainerStateTerminated(exit_code=1, message=said)
                    ),
                )
            ],
        ),
    )
    rollout = serving.rollout_state([serving.observed_pod(pod)], DIGEST)
    assert rollout.state == "failed"
    assert rollout.reason == f"pod p never started its server: fetch-weights: {said}"


def test_serves_weights_latency_and_rollback_rules():
    name = f"sre-agent@{DIGEST[:12]}"
    assert serving.serves_weights(["sre-agent", name], name).passed
    wrong = serving.serves_weights(["sre-agent", "sre-agent@000000000000"], name)
    assert not wrong.passed and wrong.metadata["expected"] == name
    assert not serving.within_budget("", 0, 0.1, 1000).passed
    slow = serving.within_budget("text", 4, 2.5, 1000)
    assert not slow.passed and "above the 1000 ms budget" in slow.description
    assert serving.within_budget("text", 4, 0.2, 1000).passed
    stats = serving.latency_stats([0.1, 0.2, 0.3, 0.4, 1.0], [10, 10, 10, 10, 10])
    assert stats["latency_p50_ms"] == 300.0 and stats["latency_p95_ms"] == 1000.0
    assert stats["tokens_per_s"] == 25.0
    assert serving.previous_version(["a", "b", "c"], "c") == "b"
    assert serving.previous_version(["c"], "c") is None


def test_an_endpoint_behind_its_models_current_version_says_both_and_for_how_long():
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    old, new = "a" * 64, "b" * 64
    fix = "materialising vllm_endpoint/sre-agent (`homelab up`)"
    behind = serving.serves_current_version(old, new, now - timedelta(hours=5), now, fix)
    assert not behind.passed
    assert behind.description == (
        f"serves {old[:12]}, but {new[:12]} has been the current version for 5.0 h: {fix} "
        "rolls it forward"
    )
    assert behind.metadata == {"served_digest": old, "current_digest": new, "behind_s": 18000}
    current = serving.serves_current_version(new, new, now - timedelta(hours=5), now, fix)
    assert current.passed and current.metadata["behind_s"] == 0
    nothing = serving.serves_current_version(None, new, now - timedelta(seconds=40), now, fix)
    assert not nothing.passed and nothing.description.startswith("serves nothing yet, but")
    assert "for 40 s" in nothing.description
    assert serving.serves_current_version(None, None, None, now, fix).passed


def test_rollback_of_an_unknown_endpoint_is_a_usage_error(project_root):
    done = subprocess.run(
        [sys.executable, "-m", "homelab_dagster", "rollback", "nope"],
        cwd=project_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "unknown endpoint 'nope' (endpoints: vllm, sre-agent)" in " ".join(done.stderr.split())


def test_the_crash_cause_is_the_root_error_not_the_last_line():
    log = "\n".join(
        [
            "(APIServer pid=1) WARNING 11-30 [system_utils.py:255] Found ulimit of 20000: "
            "fd limit errors like `OSError: [Errno 24] Too many open files`.",
            "(EngineCore pid=28) ERROR [core.py:1510] RuntimeError: Insufficient space in "
            "/dev/shm for shared-memory allocation: 160 MiB required, 64 MiB free.",
            "  File ...",
            "RuntimeError: Engine core initialization failed. See root cause above.",
        ]
    )
    cause = serving.crash_cause(log)
    assert cause.startswith("RuntimeError: Insufficient space in /dev/shm")
    assert cause.endswith("Engine core initialization failed. See root cause above.")
    assert serving.crash_cause("just a line\n") == "just a line"


def test_an_engine_killed_without_a_traceback_is_said_before_the_servers_last_words():
    # What vLLM 0.32's API server logs when its engine process is SIGKILLed (no traceback).
    log = "\n".join(
        [
            "(APIServer pid=1) INFO 12-01 [api_server.py:1100] Starting vLLM API server",
            "(APIServer pid=1) WARNING 12-01 [core_client.py:817] [shutdown] MPClient: engine "
            "core exited unexpectedly; starting cleanup",
            "(APIServer pid=1) ERROR 12-01 [async_llm.py:700] EngineDeadError: EngineCore "
            "encountered an issue. See stack trace (above) for the root cause.",
        ]
    )
    cause = serving.crash_cause(log)
    assert cause.startswith("its engine process exited without an error of its own"), cause
    assert cause.endswith(
        "EngineDeadError: EngineCore encountered an issue. See stack trace "
        "(above) for the root cause."
    ), cause
