"""The training pod as the launcher builds it, from the shipped inventory (no cluster needed)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from assets.training import gpu_request
from homelab_dagster.ml.corpus import resolve_corpus
from homelab_dagster.settings import Settings, Target
from resources.deployment import build_deployment
from resources.flyte import LocalFlyteLauncher, RemoteFlyteLauncher
from resources.training import TrainingLaunch
from resources.training_pods import (
    RENDEZVOUS_PORT,
    STORE_SECRET,
    PodTrainingLauncher,
    training_pod,
)

RUN = "sre-runbook"


@pytest.fixture
def launch(shipped_inventory, project_root) -> TrainingLaunch:
    run = shipped_inventory.training_runs[RUN]
    model = shipped_inventory.models[run.model]
    forge = shipped_inventory.clusters[run.cluster]
    launcher = PodTrainingLauncher.model_construct(corpus_root=str(project_root))
    spec = launcher.spec_for(run.model, model, run)
    return TrainingLaunch(
        RUN,
        spec,
        resolve_corpus(project_root, run.corpus),
        gpu_request(run, forge),
        "f" * 64,
        cluster=run.cluster,
        node_role=run.node_role,
        tolerations=forge.tolerations(run.node_role),
    )


def _pod(launch: TrainingLaunch, **changes) -> tuple[dict, dict]:
    request = {"run": RUN, "store": {"bucket": "ml-models", "endpoint_url": "http://s3:9000"}}
    arguments = {
        "image": "ghcr.io/homelab/homelab-training:0.1.0",
        "request": request,
        "corpus_uri": "s3://ml-models/_corpora/abc",
        "memory": launch.gpu.memory,
        "node_selector": {"role": launch.node_role},
        "threads": 1,
        "hf_token_secret": None,
        "timeout_s": 3600,
    }
    return training_pod(launch, **(arguments | changes))


def test_the_pod_asks_the_runs_gpus_and_memory_on_its_role_and_runs_one_rank_per_gpu(launch):
    meta, spec = _pod(launch)
    (train,) = spec["containers"]
    assert spec["nodeSelector"] == {"role": "training"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    wanted = {"memory": "200Gi", "nvidia.com/gpu": "2"}
    assert train["resources"] == {"requests": wanted, "limits": wanted}
    assert train["command"][:1] == ["torchrun"]
    assert "--nproc-per-node=2" in train["command"]
    assert train["command"][-2:] == ["-m", "resources.training_task"]
    assert spec["restartPolicy"] == "Never"
    assert meta["labels"]["homelab.dev/training-run"] == RUN
    (fetch,) = spec["initContainers"]
    assert fetch["command"][:3] == ["python", "-m", "resources.weights_copy"]
    assert "s3://ml-models/_corpora/abc" in fetch["command"]
    assert fetch["terminationMessagePolicy"] == train["terminationMessagePolicy"]


def test_a_run_over_several_nodes_is_a_pod_per_node_meeting_at_node_rank_zero(launch):
    """Two nodes: rank 0 names its own address for torchrun's static rendezvous (the kubelet
    expands ``$(POD_IP)``), the other pod names rank 0's, each its node rank; the scheduler is
    asked to spread them; one node stays ``--standalone``."""
    two = dataclasses.replace(launch, gpu=dataclasses.replace(launch.gpu, nodes=2))
    meta0, spec0 = _pod(two)
    meta1, spec1 = _pod(two, node_rank=1, rendezvous="10.4.128.7")
    (rank0,), (rank1,) = spec0["containers"], spec1["containers"]
    assert "--nnodes=2" in rank0["command"] and "--nnodes=2" in rank1["command"]
    assert "--node-rank=0" in rank0["command"] and "--node-rank=1" in rank1["command"]
    assert "--master-addr=$(POD_IP)" in rank0["command"]
    assert "--master-addr=10.4.128.7" in rank1["command"]
    assert f"--master-port={RENDEZVOUS_PORT}" in rank1["command"]
    assert "--standalone" not in rank0["command"]
    assert rank0["ports"] == [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    assert "ports" not in rank1
    pod_ip = next(e for e in rank0["env"] if e["name"] == "POD_IP")
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert (meta0["labels"]["homelab.dev/node-rank"], meta1["labels"]["homelab.dev/node-rank"]) == (
        "0",
        "1",
    )
    (term,) = spec1["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == {
        "homelab.dev/training-run": RUN
    }
    _, single = _pod(launch)
    assert "--standalone" in single["containers"][0]["command"]
    assert "affinity" not in single


def test_secrets_reach_the_pod_only_by_reference(launch):
    """The store's keys and the Hugging Face token are Secret references, never values; the
    token is absent (and the hub offline) unless a Secret is named."""
    _, spec = _pod(launch, hf_token_secret="hf-token")
    (train,) = spec["containers"]
    env = {e["name"]: e for e in train["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name] == {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": STORE_SECRET, "key": name}},
        }
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert "HF_HUB_OFFLINE" not in env
    request = json.loads(env["HOMELAB_TRAINING_REQUEST"]["value"])
    assert set(request) == {"run", "store"}  # nothing secret travels in the request
    _, offline = _pod(launch)
    names = {e["name"] for e in offline["containers"][0]["env"]}
    assert "HF_TOKEN" not in names and "HF_HUB_OFFLINE" in names


def test_each_target_trains_in_pods_and_says_where_it_cannot(project_root, shipped_inventory):
    twin = build_deployment(
        Settings(project_root / "homelab.yaml", Target.TWIN, project_root / ".homelab"),
        shipped_inventory,
    ).resources["training"]
    import os
    import sys

    if sys.platform.startswith("linux") and os.geteuid() == 0:
        assert isinstance(twin, PodTrainingLauncher)
        assert twin.scaled_down and twin.node_selector == {"type": "real"}
        assert twin.memory == "4Gi"
    else:  # the non-root fallback
        assert isinstance(twin, LocalFlyteLauncher)
    homelab = build_deployment(
        Settings(project_root / "homelab.yaml", Target.HOMELAB, project_root / ".homelab"),
        shipped_inventory,
    ).resources["training"]
    assert isinstance(homelab, PodTrainingLauncher)
    assert not homelab.scaled_down and homelab.node_selector == {} and homelab.memory is None
    assert homelab.image == "ghcr.io/homelab/homelab-training:0.1.0"
    flyte = shipped_inventory.model_copy(
        update={"ml": shipped_inventory.ml.model_copy(update={"launcher": "flyte"})}
    )
    chosen = build_deployment(
        Settings(project_root / "homelab.yaml", Target.HOMELAB, project_root / ".homelab"), flyte
    ).resources["training"]
    assert isinstance(chosen, RemoteFlyteLauncher)
