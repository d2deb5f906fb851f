"""The Flyte workflow, serialised for remote execution offline with flytekit's own translator."""

from __future__ import annotations

from collections import OrderedDict

import dagster as dg
import pytest
from _ml_support import needs_ml

from homelab_dagster.errors import TrainingError
from homelab_dagster.loader import load_inventory

# homelab_dagster.workflows imports the task bodies, which import torch.
pytestmark = needs_ml


@pytest.fixture(scope="module")
def serialized(project_root):
    from flytekit.configuration import Image, ImageConfig, SerializationSettings
    from flytekit.tools.translator import get_serializable

    from assets.training import gpu_request
    from homelab_dagster.workflows import TaskResources, build_training_workflow

    inventory = load_inventory(project_root / "homelab.yaml").inventory
    run = inventory.training_runs["sre-runbook"]
    gpu = gpu_request(run, inventory.clusters[run.cluster])
    image = "registry.forge.lan/homelab-dagster:1.0"
    workflow = build_training_workflow(
        "sre-runbook", TaskResources(gpu.gpus_per_node, gpu.memory, gpu.product, image)
    )
    settings = SerializationSettings(
        image_config=ImageConfig(default_image=Image(name="default", fqn="unused", tag="0")),
        project=inventory.ml.flyte_project,
        domain=inventory.ml.flyte_domain,
        version="test",
    )
    entities: OrderedDict = OrderedDict()
    workflow_spec = get_serializable(entities, settings, workflow)
    from flytekit.models.task import TaskSpec

    tasks = {
        spec.template.id.name.rsplit(".", 1)[-1]: spec.template
        for spec in entities.values()
        if isinstance(spec, TaskSpec)
    }
    return run, image, workflow_spec, tasks


def _resources(template) -> tuple[dict[str, str], dict[str, str]]:
    from flytekit.models.task import Resources

    names = {
        getattr(Resources.ResourceName, n): n for n in ("CPU", "GPU", "MEMORY", "EPHEMERAL_STORAGE")
    }

    def named(entries) -> dict[str, str]:
        return {names[e.name]: e.value for e in entries}

    resources = template.container.resources
    return named(resources.requests), named(resources.limits)


def test_the_train_task_asks_the_runs_gpus_memory_and_accelerator(serialized) -> None:
    run, image, _, tasks = serialized
    train = tasks["train"]
    requests, limits = _resources(train)
    # Flyte's GPU resource is nvidia.com/gpu on Kubernetes (propeller's gpu-resource-name).
    assert requests == limits == {"GPU": str(run.gpus_per_node), "MEMORY": run.memory}
    assert train.extended_resources.gpu_accelerator.device == "nvidia-tesla-a100"
    assert train.container.image == image
    # The container runs the module-level task: no inventory is needed inside the pod.
    assert train.container.args[-4:] == [
        "task-module",
        "homelab_dagster.workflows.tasks",
        "task-name",
        "train",
    ]


def test_only_training_and_evaluation_ask_for_gpus(serialized) -> None:
    _, image, _, tasks = serialized
    assert set(tasks) == {"prepare_dataset", "train", "evaluate", "export"}
    assert _resources(tasks["evaluate"])[0] == {"GPU": "1", "MEMORY": "200Gi"}
    for name in ("prepare_dataset", "export"):
        assert _resources(tasks[name]) == ({}, {})
        assert tasks[name].container.image == image


def test_the_workflow_is_named_after_the_run_with_typed_io(serialized) -> None:
    _, _, workflow_spec, _ = serialized
    template = workflow_spec.template
    assert template.id.name == "homelab.training.sre-runbook"
    assert set(template.interface.inputs) == {"corpus", "spec", "options"}
    assert set(template.interface.outputs) == {
        "weights",
        "digest",
        "size_bytes",
        "train",
        "evaluation",
    }
    assert [n.id for n in template.nodes] == ["n0", "n1", "n2", "n3"]


@pytest.mark.parametrize(
    ("product", "device"),
    [
        ("NVIDIA-A100-SXM4-40GB", "nvidia-tesla-a100"),
        ("NVIDIA-A100-SXM4-80GB", "nvidia-a100-80gb"),
        ("NVIDIA-H100-80GB-HBM3", "nvidia-h100"),
        ("NVIDIA-L4", "nvidia-l4"),
    ],
)
def test_gpu_products_map_to_flyte_accelerators(product: str, device: str) -> None:
    from homelab_dagster.workflows import accelerator_for

    assert accelerator_for(product).to_flyte_idl().device == device


def test_an_unknown_gpu_product_is_an_error() -> None:
    from homelab_dagster.workflows import accelerator_for

    with pytest.raises(TrainingError, match="no Flyte accelerator"):
        accelerator_for("Voodoo-5500")


@pytest.mark.slow
def test_the_remote_launcher_maps_an_unreachable_flyte_to_a_training_error(
    project_root, tmp_path, monkeypatch
) -> None:
    """The remote path runs for real up to the network: nothing listens on port 1."""
    from assets.training import gpu_request
    from homelab_dagster.ml.corpus import resolve_corpus
    from homelab_dagster.ml.spec import fingerprint
    from resources.flyte import RemoteFlyteLauncher
    from resources.training import TrainingLaunch

    monkeypatch.setenv("FLYTE_PLATFORM_URL", "127.0.0.1:1")
    monkeypatch.setenv("FLYTE_PLATFORM_INSECURE", "true")
    monkeypatch.delenv("FLYTECTL_CONFIG", raising=False)
    inventory = load_inventory(project_root / "homelab.yaml").inventory
    run = inventory.training_runs["sre-runbook"]
    (tmp_path / "doc.md").write_text("runbook text")
    launcher = RemoteFlyteLauncher(
        corpus_root=str(tmp_path), project="homelab", domain="production", image="reg/img:1"
    )
    spec = launcher.spec_for(run.model, inventory.models[run.model], run)
    assert spec.base_model == inventory.models[run.model].base_model  # the homelab fine-tunes
    assert spec.hyperparameters.steps == run.hyperparameters.steps
    corpus = resolve_corpus(tmp_path, ["*.md"])
    launch = TrainingLaunch(
        "sre-runbook",
        spec,
        corpus,
        gpu_request(run, inventory.clusters[run.cluster]),
        fingerprint(spec, corpus.digest),
    )

    with pytest.raises(TrainingError, match=r"cannot launch homelab\.training\.sre-runbook"):
        launcher.launch(dg.build_asset_context(), launch)
