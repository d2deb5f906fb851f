"""Training in pods on the twin's Forge: ``training_run/sre-runbook`` as the homelab runs it.

The deployment's launcher (``build_deployment`` on the twin, as root) is the homelab's
:class:`~resources.training_pods.PodTrainingLauncher`: the training image (built from the lock
file with the ``ml`` extra, pushed to the twin's registry) runs on ``forge-training-primary``,
a real node, as ``torchrun`` with two gloo ranks for the node's two (patched) GPUs, through
dagster-k8s's Pipes client; its corpus comes from the twin's object store through the pod's
init container and its weights go back into it. Then what goes wrong, in the cluster's own
words: three GPUs on a two-GPU node (the scheduler), a namespace quota (the quota), a corpus
changed in the store (the init container: dagster-io/dagster#32428), the pod deleted midway
(dagster-io/dagster#22453), and a pod out of memory.

Slow (the image push and a pod start per test). Needs real nodes (Linux, root, `make
system-deps`, `make tools`) and the image tools; skips elsewhere with the reason.
"""

from __future__ import annotations

import threading
import time

import dagster as dg
import pytest
from _ml_support import needs_ml, write_corpus
from _twin_support import provisioned_forge, wait

from assets._keys import training_run_key
from assets.training import build_training_run_defs
from homelab_dagster.inventory import Inventory, TrainingRun
from resources.training_pods import PodTrainingLauncher

pytestmark = [pytest.mark.twin, pytest.mark.slow, needs_ml, pytest.mark.timeout(1800)]

RUN = "sre-runbook"
NAMESPACE = "ml-training"
TRAINING_NODE = "forge-training-primary"


@pytest.fixture(scope="module")
def pods(real_forge, shipped_inventory, tmp_path_factory):
    """Forge provisioned (its namespaces and GPU quota), the training image in the twin's
    registry, and the twin's deployment resources with a project of its own (the corpus)."""
    project = write_corpus(tmp_path_factory.mktemp("project"))
    resources = provisioned_forge(
        real_forge, shipped_inventory, ["homelab-training"], project / "homelab.yaml"
    )
    assert isinstance(resources["training"], PodTrainingLauncher)
    return resources


def _run(inventory: Inventory, *, seed: int, steps: int = 20, **changes) -> TrainingRun:
    """The shipped run with its twin hyperparameters' seed and steps (a new fingerprint each)."""
    run = inventory.training_runs[RUN]
    assert run.twin_hyperparameters is not None
    hp = run.twin_hyperparameters.model_copy(update={"seed": seed, "steps": steps})
    return run.model_copy(update={"twin_hyperparameters": hp, **changes})


def _train(resources, inventory: Inventory, run: TrainingRun, **launcher_changes):
    if launcher_changes:  # a new resource (Dagster keeps a resource's config as built)
        launcher = resources["training"]
        fields = {name: getattr(launcher, name) for name in type(launcher).model_fields}
        resources = {**resources, "training": type(launcher)(**(fields | launcher_changes))}
    defs = build_training_run_defs(
        RUN, run, inventory.models[run.model], inventory.clusters[run.cluster]
    )
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        list(defs.assets or []), resources=resources, instance=instance, raise_on_error=False
    )
    lines = [e.user_message for e in instance.all_logs(result.run_id)]
    return result, lines


def _failure(result) -> str:
    events = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return events[0].step_failure_data.error.message if events else ""


def _core(twin):
    from kubernetes import client

    return client.CoreV1Api(twin.client("forge"))


def _training_pods(twin) -> list:
    return (
        _core(twin)
        .list_namespaced_pod(NAMESPACE, label_selector=f"homelab.dev/training-run={RUN}")
        .items
    )


def test_a_run_trains_in_a_pod_on_the_real_training_node_with_two_ranks(
    pods, real_forge, shipped_inventory
):
    """The pod runs on forge-training-primary with both its GPUs as two ranks; Dagster gets
    the pod's lines as they come (loss per step), the result (pod, node, world size,
    GPU-seconds) and the weights' URI in the store, where the weights are; the pod is gone."""
    run = _run(shipped_inventory, seed=11)
    result, lines = _train(pods, shipped_inventory, run)
    assert result.success, _failure(result) + "\n" + "\n".join(lines[-30:])
    (event,) = result.get_asset_materialization_events()
    assert event.asset_key == training_run_key(RUN)
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["node"] == TRAINING_NODE
    assert metadata["pod"].startswith("dagster-")
    assert metadata["world_size"] == 2
    assert metadata["gpu_seconds"] > 0
    assert metadata["train_steps"] == 20
    assert metadata["weights_uri"].startswith("s3://ml-models/sre-agent/versions/")
    # Rank 0's lines, through Pipes, in the run's log (not only the pod's).
    assert any("step 10/20 loss" in line for line in lines), lines
    assert any("2 rank(s) (gloo)" in line for line in lines), lines
    # The weights are in the store, every file verified (stage finds them all there).
    store = pods["weights_store"]
    staged = store.stage("sre-agent", metadata["weights_uri"], metadata["weights_digest"])
    assert staged.reused == len(staged.files) > 0
    # Staged, not listed: model_weights registers them.
    assert metadata["weights_digest"] not in {v.digest for v in store.versions("sre-agent")}
    assert wait(lambda: not _training_pods(real_forge), timeout=30) is True


def test_a_run_over_two_nodes_trains_as_two_pods_meeting_at_node_rank_zero(
    pods, real_forge, shipped_inventory
):
    """``nodes: 2`` x one GPU: the Pipes client's pod is node rank 0, the launcher makes the
    second pod once rank 0 has an address, torchrun's rendezvous joins their ranks into one
    world of two, and the GPU-seconds count both pods. (The twin has one real training node,
    so both land on it: the homelab's scheduler spreads them, the spec asking it to.)"""
    run = _run(shipped_inventory, seed=17, nodes=2, gpus_per_node=1)
    seen: set[str] = set()
    stop = threading.Event()

    def note_pods() -> None:
        while not stop.wait(0.5):
            seen.update(p.metadata.name for p in _training_pods(real_forge))

    watcher = threading.Thread(target=note_pods, daemon=True)
    watcher.start()
    try:
        result, lines = _train(pods, shipped_inventory, run)
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert result.success, _failure(result) + "\n" + "\n".join(lines[-30:])
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["world_size"] == 2
    assert metadata["nodes"] == TRAINING_NODE
    assert metadata["gpu_seconds"] > 0
    assert seen == {metadata["pod"], f"{metadata['pod']}-node-1"}, seen
    assert any("2 rank(s) (gloo) in 2 pod(s)" in line for line in lines), lines
    assert any(f"{metadata['pod']}-node-1" in line and "join it" in line for line in lines), lines
    assert wait(lambda: not _training_pods(real_forge), timeout=30) is True


def test_a_worker_pod_deleted_midway_fails_the_step_naming_it(pods, real_forge, shipped_inventory):
    """The second pod deleted while the ranks train: rank 0 is stopped (its collectives would
    wait for the lost rank) and the step fails naming the worker, not rank 0; nothing is
    left running."""
    core = _core(real_forge)
    run = _run(shipped_inventory, seed=18, steps=2000, nodes=2, gpus_per_node=1)
    deleted: list[str] = []

    def delete_worker_when_training() -> None:
        def worker():
            return [
                p
                for p in _training_pods(real_forge)
                if p.metadata.labels.get("homelab.dev/node-rank") == "1"
                and any(s.state.running for s in p.status.container_statuses or [])
            ]

        found = wait(worker, timeout=600, interval=1.0)
        if found:
            time.sleep(15)  # into the training loop
            name = found[0].metadata.name
            core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
            deleted.append(name)

    killer = threading.Thread(target=delete_worker_when_training, daemon=True)
    killer.start()
    result, _ = _train(pods, shipped_inventory, run)
    killer.join(timeout=10)
    assert deleted, "the second pod never ran"
    assert not result.success
    assert f"pod {deleted[0]} was deleted while it ran" in _failure(result), _failure(result)
    assert wait(lambda: not _training_pods(real_forge), timeout=30) is True


def test_three_gpus_on_a_two_gpu_node_fail_in_the_schedulers_words(
    pods, real_forge, shipped_inventory
):
    run = _run(shipped_inventory, seed=12, gpus_per_node=3)
    started = time.monotonic()
    result, _ = _train(pods, shipped_inventory, run, unschedulable_grace_s=5.0)
    assert not result.success
    message = _failure(result)
    assert "could not be placed on any node" in message
    assert "Insufficient nvidia.com/gpu" in message
    assert time.monotonic() - started < 120
    assert wait(lambda: not _training_pods(real_forge), timeout=30) is True


def test_a_run_above_the_namespace_quota_fails_in_the_quotas_words(
    pods, real_forge, shipped_inventory
):
    core = _core(real_forge)
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "tight"},
        "spec": {"hard": {"requests.nvidia.com/gpu": "1"}},
    }
    core.create_namespaced_resource_quota(NAMESPACE, quota)
    try:
        # The quota controller fills the quota's status before the admission enforces it.
        wait(lambda: core.read_namespaced_resource_quota("tight", NAMESPACE).status.hard)
        result, _ = _train(pods, shipped_inventory, _run(shipped_inventory, seed=13))
    finally:
        core.delete_namespaced_resource_quota("tight", NAMESPACE)
    assert not result.success
    message = _failure(result)
    assert "the cluster refused the pod" in message
    assert "exceeded quota: tight" in message and "requests.nvidia.com/gpu" in message


def test_a_corpus_changed_in_the_store_fails_the_init_container_naming_the_file(
    pods, real_forge, shipped_inventory, tmp_path
):
    """dagster-io/dagster#32428: the Pipes client waits for ever on a failed init container;
    here the step fails with the copy step's own words."""
    from homelab_dagster.ml.corpus import resolve_corpus
    from resources.weights import corpus_prefix

    project = write_corpus(tmp_path / "project")
    (project / "docs" / "extra.md").write_text("A corpus of this test's own.\n")
    run = _run(shipped_inventory, seed=14)
    store = pods["weights_store"]
    corpus = resolve_corpus(project, run.corpus)
    store.stage_corpus(corpus)
    key = f"{corpus_prefix(corpus.digest)}/docs/extra.md"
    store.store.client.put_object(Bucket=store.bucket, Key=key, Body=b"changed behind its back\n")
    assert store.store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read() == (
        b"changed behind its back\n"
    )
    started = time.monotonic()
    result, _ = _train(pods, shipped_inventory, run, corpus_root=str(project))
    assert not result.success
    message = _failure(result)
    assert "init container fetch-corpus failed" in message
    assert "docs/extra.md" in message and "was changed" in message
    assert time.monotonic() - started < 300
    assert wait(lambda: not _training_pods(real_forge), timeout=30) is True


def test_a_pod_deleted_midway_fails_the_step_saying_so_and_the_next_run_trains(
    pods, real_forge, shipped_inventory
):
    """dagster-io/dagster#22453: the Pipes client waits for ever on a deleted pod; here the
    step fails at once saying so, nothing is listed, and re-materialising trains again."""
    core = _core(real_forge)
    store = pods["weights_store"]
    listed = store.versions("sre-agent")
    run = _run(shipped_inventory, seed=15, steps=2000)
    deleted_at: list[float] = []

    def delete_when_training() -> None:
        def running():
            return [
                p
                for p in _training_pods(real_forge)
                if p.status.phase == "Running"
                and any(s.state.running for s in p.status.container_statuses or [])
            ]

        found = wait(running, timeout=600, interval=1.0)
        if found:
            time.sleep(15)  # into the training loop
            core.delete_namespaced_pod(found[0].metadata.name, NAMESPACE, grace_period_seconds=0)
            deleted_at.append(time.monotonic())

    killer = threading.Thread(target=delete_when_training, daemon=True)
    killer.start()
    result, _ = _train(pods, shipped_inventory, run)
    ended = time.monotonic()
    killer.join(timeout=10)
    assert deleted_at, "the training pod never ran"
    assert not result.success
    message = _failure(result)
    assert "was deleted while it ran" in message or "killed by signal" in message, message
    assert ended - deleted_at[0] < 60
    assert store.versions("sre-agent") == listed  # nothing half-registered is listed

    again, lines = _train(pods, shipped_inventory, _run(shipped_inventory, seed=15))
    assert again.success, _failure(again) + "\n" + "\n".join(lines[-30:])


def test_a_pod_out_of_memory_fails_the_step_with_that_reason(pods, real_forge, shipped_inventory):
    result, _ = _train(pods, shipped_inventory, _run(shipped_inventory, seed=16), memory="200Mi")
    assert not result.success
    message = _failure(result)
    assert "out of memory" in message or "OOMKilled" in message, message
    assert wait(lambda: not _training_pods(real_forge), timeout=30) is True


def test_the_hugging_face_token_reaches_the_pod_and_nothing_else(
    pods, real_forge, shipped_inventory
):
    """The token a gated base model needs: a Secret the pod reads (``ml.hf_token_secret``);
    its value is in no log line, metadata, run configuration or pod spec Dagster saw."""
    import secrets as pysecrets

    core = _core(real_forge)
    canary = f"hf_canary{pysecrets.token_hex(8)}"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf-token"},
        "stringData": {"token": canary},
    }
    core.create_namespaced_secret(NAMESPACE, secret)
    try:
        run = _run(shipped_inventory, seed=17)
        result, lines = _train(pods, shipped_inventory, run, hf_token_secret="hf-token")
    finally:
        core.delete_namespaced_secret("hf-token", NAMESPACE)
    assert result.success, _failure(result) + "\n" + "\n".join(lines[-30:])
    assert any("the hub: a Hugging Face token from its Secret" in line for line in lines), lines
    (event,) = result.get_asset_materialization_events()
    recorded = [*lines, repr(event.materialization.metadata), repr(result.dagster_run.run_config)]
    recorded += [str(e) for e in result.all_events]
    assert not [r for r in recorded if canary in r]


def test_a_missing_token_secret_fails_the_step_naming_it(pods, real_forge, shipped_inventory):
    """The kubelet cannot make the container (CreateContainerConfigError) and would retry for
    ever; the step fails at once with its words, the Secret's name in them."""
    run = _run(shipped_inventory, seed=18)
    started = time.monotonic()
    result, _ = _train(pods, shipped_inventory, run, hf_token_secret="no-such-secret")
    assert not result.success
    message = _failure(result)
    assert "CreateContainerConfigError" in message and "no-such-secret" in message, message
    assert time.monotonic() - started < 300
    assert wait(lambda: not _training_pods(real_forge), timeout=30) is True


def test_a_node_that_cannot_start_sandboxes_fails_the_step_and_twin_up_repairs_it(
    pods, real_forge, shipped_inventory
):
    """The training node's pause image gone (containerd's image GC under disk pressure did it
    once): the pod is placed and stays Pending while the kubelet fails to make its sandbox.
    The step fails after the grace with the kubelet's words; ``twin up`` imports the pause
    image again and the node starts pods."""
    import subprocess

    from homelab_dagster.twin_host import which
    from homelab_dagster.twin_real import PAUSE_IMAGE_REPOSITORY

    (spec,) = [s for s in real_forge.real.specs("forge") if s.name == TRAINING_NODE]
    (pause,) = [i for i in real_forge.real.images(spec) if i.startswith(PAUSE_IMAGE_REPOSITORY)]
    ctr = [which("ctr"), "--address", str(spec.socket), "-n", "k8s.io"]
    subprocess.run([*ctr, "images", "rm", pause], check=True, capture_output=True)
    try:
        started = time.monotonic()
        run = _run(shipped_inventory, seed=19)
        result, _ = _train(pods, shipped_inventory, run, unschedulable_grace_s=20.0)
        assert not result.success
        message = _failure(result)
        assert f"is on {TRAINING_NODE}, whose kubelet cannot set it up" in message, message
        assert "FailedCreatePodSandBox" in message and "pause" in message, message
        assert time.monotonic() - started < 300
    finally:
        said: list[str] = []
        real_forge.up(["forge"], progress=lambda _cluster, message: said.append(message))
    assert pause in real_forge.real.images(spec)
    assert f"real node {TRAINING_NODE}: running, its pause image imported again" in said, said
    assert wait(lambda: not _training_pods(real_forge), timeout=30) is True
