"""vLLM on the twin, end to end: trained weights served by a pod on Forge's real inference node.

A tiny GPT-2 (head width 32) is trained on the CPU and registered in the twin's weights store
(the S3 bucket of the twin's object store); ``vllm_endpoint/sre-agent`` deploys vLLM's CPU
build (the image ``homelab twin images`` builds from ``images/vllm-cpu/uv.lock``) on
``forge-inference``, whose copy step (the project's image) fetches that version from the bucket
and verifies it before the server starts, and its checks talk to it through the API server's
port-forward. Then: a killed pod is brought back by the next materialisation; a version whose
head width the runtime refuses is caught and the previous version keeps serving; a version
changed in the store behind its back fails its pod's copy step, naming the file, and the
previous version keeps serving; tensor parallelism 4 on GPUs fails with the scheduler's words
(forge-inference has 2).

Slow (minutes: vLLM's CPU build starts in about 30 s idle, several minutes under load). Needs
real nodes (Linux, root, `make system-deps`, `make tools`) and the image tools of
``infra/images.py``; skips elsewhere with the reason.
"""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest
from _ml_support import CPU, needs_ml, write_corpus
from _twin_support import provisioned_forge, wait

from assets._keys import endpoint_key
from assets.endpoints import CHECKS, FRESHNESS_CHECK, build_endpoint_defs
from assets.jobs import build_jobs
from homelab_dagster.ml.spec import Architecture, Hyperparameters, TrainSpec
from homelab_dagster.settings import Settings, Target

# Each test (with the module's training and image build in the first) takes minutes, and more
# under CI's load: above the suite's 600 s default (seen: the rollback test cut at 600 s).
pytestmark = [pytest.mark.twin, pytest.mark.slow, needs_ml, pytest.mark.timeout(2400)]

ENDPOINT = "sre-agent"
# The shipped sre-agent's architecture (head width 64 / 2 = 32).
ARCH = Architecture(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=512)


@pytest.fixture(scope="module")
def serving(real_forge, shipped_inventory, tmp_path_factory):
    """forge provisioned, the vLLM image in the twin's registry, a trained version current."""
    # The server's image and the copy step's (the project's own).
    resources = provisioned_forge(
        real_forge,
        shipped_inventory,
        ["vllm-cpu", "homelab-dagster"],
        real_forge.root.parent / "homelab.yaml",
    )
    from homelab_dagster.ml.train import run_pipeline

    work = tmp_path_factory.mktemp("train")
    spec = TrainSpec(
        model=ENDPOINT,
        hyperparameters=Hyperparameters(steps=20, batch_size=8, seq_len=64, learning_rate=3e-3),
        architecture=ARCH,
    )
    weights, digest, _, _ = run_pipeline(write_corpus(work / "corpus"), work, spec, CPU)
    store = resources["weights_store"]
    version, _ = store.register(
        ENDPOINT, str(weights), source_run="sre-runbook", execution_id="local-test"
    )
    assert version.digest == digest
    store.set_current(ENDPOINT, digest, "trained by the test")
    return resources, weights


def _materialize(resources, inventory, name=ENDPOINT, endpoint=None, selection=None, **kwargs):
    endpoint = endpoint or inventory.endpoints[name]
    defs = build_endpoint_defs(
        name,
        endpoint,
        inventory.models[endpoint.model],
        inventory.clusters[endpoint.cluster],
    )
    return dg.materialize(
        list(defs.assets or []),
        resources=resources,
        raise_on_error=False,
        selection=selection or [endpoint_key(name)],
        **kwargs,
    )


def _checks(result):
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _metadata(result, name=ENDPOINT):
    (m,) = result.asset_materializations_for_node(f"vllm_endpoint__{name.replace('-', '_')}")
    return {k: v.value for k, v in m.metadata.items()}


def _failure(result) -> str:
    events = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return events[0].step_failure_data.error.message if events else ""


def _deployments(real_forge) -> list[str]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apps = client.AppsV1Api(real_forge.client("forge"))
    try:
        return [d.metadata.name for d in apps.list_namespaced_deployment("ml-inference").items]
    except ApiException as exc:
        if exc.status == 404:
            return []
        raise


def _delete_from_registry(registry, reference: str) -> None:
    """What a user removing an image by hand does: its manifest deleted (the blobs stay)."""
    import urllib.request

    from homelab_dagster.images import registry_path

    repository, _, tag = registry_path(reference).rpartition(":")
    digest = registry.manifest_digest(repository, tag)
    assert digest, f"{reference} should be in the registry"
    request = urllib.request.Request(
        f"http://{registry.address}/v2/{repository}/manifests/{digest}", method="DELETE"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
    assert registry.manifest_digest(repository, tag) is None


def test_an_image_missing_from_the_registry_fails_the_step_before_it_deploys_and_up_restores_it(
    serving, shipped_inventory, real_forge, project_root
):
    """The vLLM image removed from the twin's registry by hand: the endpoint's step fails at
    once, naming the image and the command, and nothing reaches the cluster; the CLI's `twin
    up` path puts it back (a push: the build is cached), and `homelab twin status` says the
    registry's image is what its lock file builds."""
    import os
    import subprocess
    import sys

    from homelab_dagster.cli.twin import ensure_images
    from homelab_dagster.images import image_reference

    resources, _ = serving
    vllm_cpu = image_reference("vllm-cpu")
    assert ENDPOINT not in _deployments(real_forge)  # this module's first deploy is below
    _delete_from_registry(real_forge.registry, vllm_cpu)
    said: list[str] = []
    try:
        failed = _materialize(resources, shipped_inventory)
        assert not failed.success
        message = _failure(failed)
        assert f"image {vllm_cpu} is not in the twin's registry" in message, message
        assert "`homelab twin images vllm-cpu`" in message, message
        assert ENDPOINT not in _deployments(real_forge)  # nothing half-applied
    finally:
        ensure_images(real_forge, ["forge"], lambda name, what: said.append(f"{name}: {what}"))
    assert any(line.startswith("vllm-cpu: pushing") for line in said), said
    assert real_forge.registry.require(vllm_cpu)

    env = {
        **os.environ,
        "HOMELAB_STATE_DIR": str(real_forge.root.parent),
        "HOMELAB_TWIN_PORT_BASE": str(real_forge.api_port_base),
        "HOMELAB_INVENTORY": str(project_root / "homelab.yaml"),
        "COLUMNS": "200",
    }
    env.pop("HOMELAB_TARGET", None)
    status = subprocess.run(
        [sys.executable, "-m", "homelab_dagster", "twin", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    (row,) = [line for line in status.stdout.splitlines() if vllm_cpu in line]
    assert "matches" in row, status.stdout


def test_the_trained_weights_serve_from_the_real_node_checked_then_a_bad_version_rolls_back(
    serving, shipped_inventory, real_forge, capsys
):
    from homelab_dagster.cli.endpoints import print_serving

    resources, weights = serving
    store = resources["weights_store"]
    first = store.current(ENDPOINT)
    assert first is not None

    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(resources, shipped_inventory, instance=instance)
    assert result.success, _failure(result)
    checks = _checks(result)
    assert all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}
    meta = _metadata(result)
    assert meta["weights_digest"] == first.digest
    assert meta["node"] == "forge-inference"
    assert meta["training_run"] == "sre-runbook"
    assert f"{ENDPOINT}@{first.digest[:12]}" in checks["serves_weights"].metadata["observed"].value
    assert meta["url"] == "http://sre-agent.ml-inference.svc.cluster.local:8000/v1"
    assert meta["sample_completion"] == checks["completion_within_budget"].metadata["sample"].value
    # The weights came from the store's bucket, through the copy step, verified; no hostPath.
    assert meta["weights_uri"] == f"s3://{store.bucket}/{ENDPOINT}/versions/{first.digest}"
    pod, copied = _copy_step(real_forge, meta["pod"])
    assert not any(v.host_path for v in pod.spec.volumes)
    assert "every file and the tree digest verified" in copied, copied
    # What `homelab up` prints after the run: the endpoint, its node, and how to reach it.
    capsys.readouterr()
    settings = Settings(
        real_forge.root.parent / "homelab.yaml",
        Target.TWIN,
        real_forge.root.parent,
        twin_port_base=real_forge.api_port_base,
    )
    print_serving(result.run_id, settings, shipped_inventory, instance=instance)
    printed = capsys.readouterr().out
    assert f"{ENDPOINT} on forge-inference, weights {first.digest[:12]}" in printed, printed
    assert f"url (in its cluster): {meta['url']}" in printed
    assert (
        f"--context twin-forge -n ml-inference port-forward svc/{ENDPOINT} 8000:8000" in printed
    ), printed
    print(
        f"p50 {meta['latency_p50_ms']} ms, p95 {meta['latency_p95_ms']} ms, "
        f"{meta['tokens_per_s']} tokens/s"
    )

    # Killed: the next check fails (its replacement is not serving yet), and the next
    # materialisation brings a pod back (the Deployment's own replacement).
    from kubernetes import client

    core = client.CoreV1Api(real_forge.client("forge"))
    core.delete_namespaced_pod(meta["pod"], "ml-inference", grace_period_seconds=0)
    checked = _materialize(
        resources,
        shipped_inventory,
        selection=dg.AssetSelection.checks_for_assets(endpoint_key(ENDPOINT)),
    )
    # Blocking checks that fail fail their run (so the failure sensor and webhook hear of it).
    assert not checked.success
    assert "3 blocking asset checks failed" in _failure(checked), _failure(checked)
    assert not checked.asset_materializations_for_node(
        f"vllm_endpoint__{ENDPOINT.replace('-', '_')}"
    )
    after_kill = _checks(checked)
    fresh = after_kill.pop(FRESHNESS_CHECK)  # what is deployed is current: only it passes
    assert fresh.passed, fresh.description
    assert set(after_kill) == set(CHECKS) and not any(c.passed for c in after_kill.values())
    assert f"version {first.digest[:12]} does not serve" in after_kill["serves_weights"].description
    again = _materialize(resources, shipped_inventory)
    assert again.success, _failure(again)
    assert _metadata(again)["pod"] != meta["pod"]

    # A version vLLM's CPU attention refuses (head width 16): caught, the first one restored.
    bad_dir = weights.parent / "bad"
    shutil.copytree(weights, bad_dir)
    config = json.loads((bad_dir / "config.json").read_text())
    config["n_head"] = 4
    (bad_dir / "config.json").write_text(json.dumps(config))
    bad, _ = store.register(ENDPOINT, str(bad_dir), source_run="sre-runbook")
    store.set_current(ENDPOINT, bad.digest, "a version that cannot serve")
    rolled = _materialize(resources, shipped_inventory)
    assert not rolled.success
    restored = _metadata(rolled)
    assert restored["weights_digest"] == first.digest
    assert restored["rolled_back_to"] == first.digest and restored["serving"]
    serves = _checks(rolled)["serves_weights"]
    assert not serves.passed and f"{first.digest[:12]} was restored" in serves.description
    # The endpoint is behind its model's current version now, and says so (a warning).
    behind = _checks(rolled)[FRESHNESS_CHECK]
    assert not behind.passed and behind.severity == dg.AssetCheckSeverity.WARN
    assert (
        f"serves {first.digest[:12]}, but {bad.digest[:12]} has been the current version for"
        in behind.description
    ), behind.description
    assert behind.metadata["current_digest"].value == bad.digest
    store.set_current(ENDPOINT, first.digest, "back to the good one")


def _copy_step(real_forge, pod_name: str):
    """The pod ``pod_name`` and what its copy step (init container) printed."""
    from kubernetes import client

    core = client.CoreV1Api(real_forge.client("forge"))
    pod = core.read_namespaced_pod(pod_name, "ml-inference")
    log = core.read_namespaced_pod_log(pod_name, "ml-inference", container="fetch-weights")
    return pod, log


def test_a_version_changed_in_the_store_fails_its_check_and_its_copy_step_the_previous_serves(
    serving, shipped_inventory, real_forge
):
    """Behind the store's back (its data directory), one file of a newer version changed:
    weights_intact fails naming it; the endpoint's pod for that version fails in its copy
    step with the mismatch, naming the file, before vLLM starts; the previous version is
    restored and serves."""
    from assets.weights import INTACT_CHECK, build_model_weights_defs
    from resources.weights import version_prefix

    resources, weights = serving
    store = resources["weights_store"]
    first = store.current(ENDPOINT)
    deployed = _materialize(resources, shipped_inventory)
    assert deployed.success and _metadata(deployed)["weights_digest"] == first.digest

    newer_dir = weights.parent / "newer"
    shutil.copytree(weights, newer_dir)
    (newer_dir / "README.md").write_text("the same weights, one more file: another digest\n")
    newer, _ = store.register(ENDPOINT, str(newer_dir), source_run="sre-runbook")
    store.set_current(ENDPOINT, newer.digest, "a version changed behind the store's back")
    on_disk = real_forge.store.data / store.bucket / version_prefix(ENDPOINT, newer.digest)
    (on_disk / "config.json").write_text("{}")
    try:
        model = shipped_inventory.models[ENDPOINT]
        runs = {"sre-runbook": shipped_inventory.training_runs["sre-runbook"]}
        weights_defs = build_model_weights_defs(ENDPOINT, model, runs)
        checked = dg.materialize(
            [*(weights_defs.assets or []), *(weights_defs.asset_checks or [])],
            resources=resources,
            raise_on_error=False,
            selection=dg.AssetSelection.checks(
                dg.AssetCheckKey(dg.AssetKey(["model_weights", ENDPOINT]), INTACT_CHECK)
            ),
        )
        (intact,) = checked.get_asset_check_evaluations()
        assert not intact.passed and "config.json" in intact.description, intact.description

        rolled = _materialize(resources, shipped_inventory)
        assert not rolled.success
        restored = _metadata(rolled)
        assert restored["weights_digest"] == first.digest and restored["serving"]
        serves = _checks(rolled)["serves_weights"]
        assert "fetch-weights: weights copy failed: config.json" in serves.description, (
            serves.description
        )
        assert f"{first.digest[:12]} was restored" in serves.description
    finally:
        store.set_current(ENDPOINT, first.digest, "back to the good one")


def test_tensor_parallel_4_fails_with_the_schedulers_reason(serving, shipped_inventory):
    resources, _ = serving
    too_big = shipped_inventory.endpoints[ENDPOINT].model_copy(
        update={"tensor_parallel_size": 4, "accelerator": "gpu", "node_port": None}
    )
    result = _materialize(resources, shipped_inventory, name="too-big", endpoint=too_big)
    assert not result.success
    failure = _failure(result)
    assert "the scheduler cannot place pod too-big-" in failure
    assert "Insufficient nvidia.com/gpu" in failure
    # Nothing else disturbed: the sre-agent endpoint still serves.
    from kubernetes import client

    core = client.CoreV1Api(resources["kubernetes"].api_client("forge"))

    def serving_pods():
        pods = core.list_namespaced_pod(
            "ml-inference", label_selector=f"app.kubernetes.io/instance={ENDPOINT}"
        ).items
        return [p for p in pods if p.status.phase == "Running"]

    assert wait(serving_pods, timeout=10)


def test_the_70b_endpoint_the_twin_cannot_fetch_is_placed_then_scaled_to_zero(
    serving, shipped_inventory, real_forge, capsys
):
    """The shipped ``vllm`` endpoint (Llama 3.1 70B, served by its hub id, which the offline
    twin cannot fetch): its pod is placed on forge-inference with its 2 GPUs, then the
    endpoint is scaled to zero with no pod left, and its serving checks are skipped with the
    reason, which the CLI's serving summary prints. (`make up` once waited out
    ready_timeout_s here, for a rollout of zero pods.)"""
    from kubernetes import client

    settings = Settings(
        real_forge.root.parent / "homelab.yaml",
        Target.TWIN,
        real_forge.root.parent,
        twin_port_base=real_forge.api_port_base,
    )

    from homelab_dagster.cli.endpoints import print_serving

    resources, _ = serving
    with dg.DagsterInstance.ephemeral() as instance:
        result = _materialize(resources, shipped_inventory, name="vllm", instance=instance)
        assert result.success, _failure(result)
        capsys.readouterr()
        print_serving(result.run_id, settings, shipped_inventory, instance=instance)
    metadata = _metadata(result, "vllm")
    assert metadata["serving"] is False and metadata["scheduled_on"] == "forge-inference"
    assert "then it is scaled to zero" in metadata["skipped_reason"]
    printed = capsys.readouterr().out
    assert "vllm not served here: skipped: no version of llama-3.1-70b-instruct" in printed
    assert "url (in its cluster)" not in printed, printed
    checks = _checks(result)
    fresh = checks.pop(FRESHNESS_CHECK)  # no version in the store: nothing to be behind
    assert fresh.passed and fresh.description == "the model has no current version in the store"
    assert set(checks) == set(CHECKS) and all(not c.passed for c in checks.values())
    assert all(c.metadata["skipped"].value is True for c in checks.values())
    core = client.CoreV1Api(resources["kubernetes"].api_client("forge"))
    pods = core.list_namespaced_pod(
        "ml-inference", label_selector="app.kubernetes.io/instance=vllm"
    ).items
    assert pods == []

    # The preview job's op of the endpoint plans what materialising would deploy: the same
    # program, so nothing to change right after it.
    defs = dg.Definitions.merge(build_jobs(shipped_inventory), dg.Definitions(resources=resources))
    preview = defs.resolve_job_def("preview").execute_in_process(
        op_selection=["preview_vllm_endpoint_vllm"]
    )
    assert preview.success
    [observed] = [
        e.event_specific_data.asset_observation
        for e in preview.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
    ]
    assert observed.asset_key == endpoint_key("vllm")
    assert observed.metadata["pulumi_operation"].value == "preview"
    assert observed.metadata["pulumi_changed"].value == 0, observed.metadata["pulumi_plan"]


def test_teardown_destroys_the_endpoints_stack_and_its_server(serving, shipped_inventory):
    """``homelab down``'s job: the endpoint's stack is destroyed (before its cluster's, whose
    namespaces would otherwise take the objects from under Pulumi's state)."""
    from kubernetes import client

    from assets.jobs import build_jobs

    resources, _ = serving
    defs = dg.Definitions.merge(build_jobs(shipped_inventory), dg.Definitions(resources=resources))
    result = defs.resolve_job_def("teardown").execute_in_process(
        op_selection=["destroy_vllm_endpoint_sre_agent"]
    )
    assert result.success
    assert resources["pulumi"].outputs(f"twin.vllm_endpoint.{ENDPOINT}") == {}
    apps = client.AppsV1Api(resources["kubernetes"].api_client("forge"))

    def gone() -> bool:  # the Deployment goes once its pod has (foreground deletion)
        return not apps.list_namespaced_deployment(
            "ml-inference", label_selector=f"app.kubernetes.io/instance={ENDPOINT}"
        ).items

    assert wait(gone, timeout=60), "the endpoint's Deployment is still there"
