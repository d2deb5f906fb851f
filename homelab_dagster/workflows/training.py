"""The training workflow of one run: prepare dataset -> train -> evaluate -> export.

:func:`build_training_workflow` names the workflow after the run (``homelab.training.<run>``)
and gives its tasks the run's resources: ``train`` and ``evaluate`` request the run's
GPUs per node (``nvidia.com/gpu``; ``evaluate`` one of them), its memory and the GPU
product as Flyte's accelerator; ``prepare_dataset`` and ``export`` need no GPU. With
``gpus=0`` (local execution on the twin) no task requests anything. Every task runs in ``image``.

Flyte turns the accelerator into a node selector on the label its propeller is configured
with (``gpu-device-node-label``, ``k8s.amazonaws.com/accelerator`` by default); see
docs/training.md for Forge's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from flytekit import Resources, Workflow
from flytekit.core.python_function_task import PythonFunctionTask
from flytekit.extras import accelerators
from flytekit.types.directory import FlyteDirectory

from homelab_dagster.errors import TrainingError
from homelab_dagster.ml.spec import EvalReport, TrainOptions, TrainReport, TrainSpec
from homelab_dagster.workflows import tasks

__all__ = ["TaskResources", "accelerator_for", "build_training_workflow", "workflow_name"]

# The device plugin's product label (nvidia.com/gpu.product) -> flytekit's accelerator.
_PRODUCTS: tuple[tuple[str, accelerators.BaseAccelerator], ...] = (
    ("A100-SXM4-80GB", accelerators.A100_80GB),
    ("A100-80GB", accelerators.A100_80GB),
    ("A100", accelerators.A100),
    ("H200", accelerators.H200),
    ("H100", accelerators.H100),
    ("L40S", accelerators.L40S),
    ("L4", accelerators.L4),
    ("A10G", accelerators.A10G),
    ("T4", accelerators.T4),
    ("V100", accelerators.V100),
)


@dataclass(frozen=True)
class TaskResources:
    """What a run's GPU tasks request, from the inventory's training run and its cluster."""

    gpus: int
    memory: str
    gpu_product: str | None = None
    image: str | None = None


def accelerator_for(product: str) -> accelerators.BaseAccelerator:
    """flytekit's accelerator for a device-plugin product string (``NVIDIA-A100-SXM4-40GB``).

    Raises:
        TrainingError: the product is not one flytekit names.
    """
    upper = product.upper()
    for marker, accelerator in _PRODUCTS:
        if marker in upper:
            return accelerator
    known = ", ".join(marker for marker, _ in _PRODUCTS)
    raise TrainingError(f"GPU product {product!r} has no Flyte accelerator (known: {known})")


def workflow_name(run: str) -> str:
    """The Flyte workflow (and default launch plan) name of training run ``run``."""
    return f"homelab.training.{run}"


def _with_resources(
    template: PythonFunctionTask, resources: TaskResources, gpus: int
) -> PythonFunctionTask:
    """A copy of module-level task ``template`` asking ``gpus`` GPUs (same function and name)."""
    extra: dict[str, object] = {}
    if gpus > 0:
        request = Resources(gpu=str(gpus), mem=resources.memory)
        extra = {"requests": request, "limits": request}
        if resources.gpu_product:
            extra["accelerator"] = accelerator_for(resources.gpu_product)
    return PythonFunctionTask(
        task_config=None,
        task_function=template.task_function,
        container_image=resources.image,
        **extra,
    )


def build_training_workflow(run: str, resources: TaskResources) -> Workflow:
    """The workflow of training run ``run``.

    Inputs: ``corpus`` (a directory of text files), ``spec`` (:class:`TrainSpec`),
    ``options`` (:class:`TrainOptions`). Outputs: ``weights`` (a directory of Hugging Face
    format weights), ``digest`` and ``size_bytes`` of those files, ``train``
    (:class:`TrainReport`) and ``evaluation`` (:class:`EvalReport`).
    """
    prepare = _with_resources(tasks.prepare_dataset, resources, gpus=0)
    train = _with_resources(tasks.train, resources, gpus=resources.gpus)
    evaluate = _with_resources(tasks.evaluate, resources, gpus=min(1, resources.gpus))
    export = _with_resources(tasks.export, resources, gpus=0)

    wf = Workflow(name=workflow_name(run))
    corpus = wf.add_workflow_input("corpus", FlyteDirectory)
    spec = wf.add_workflow_input("spec", TrainSpec)
    options = wf.add_workflow_input("options", TrainOptions)
    dataset = wf.add_entity(prepare, corpus=corpus, spec=spec)
    trained = wf.add_entity(train, dataset=dataset.outputs["o0"], spec=spec, options=options)
    evaluated = wf.add_entity(
        evaluate,
        checkpoint=trained.outputs["checkpoint"],
        dataset=dataset.outputs["o0"],
        options=options,
    )
    exported = wf.add_entity(export, checkpoint=trained.outputs["checkpoint"])
    wf.add_workflow_output("weights", exported.outputs["weights"], python_type=FlyteDirectory)
    wf.add_workflow_output("digest", exported.outputs["digest"], python_type=str)
    wf.add_workflow_output("size_bytes", exported.outputs["size_bytes"], python_type=int)
    wf.add_workflow_output("train", trained.outputs["report"], python_type=TrainReport)
    wf.add_workflow_output("evaluation", evaluated.outputs["o0"], python_type=EvalReport)
    return wf
