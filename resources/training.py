"""What every training launcher shares: the request, the outcome, and the resource's contract.

Assets are typed against :class:`TrainingLauncher`; the definitions choose the implementation
(:mod:`resources.deployment`):

- :class:`~resources.training_pods.PodTrainingLauncher`: a pod on the run's cluster, through
  dagster-k8s's Pipes client (both targets, wherever the cluster has a node that runs pods);
- :class:`~resources.flyte.RemoteFlyteLauncher`: a Flyte execution on Forge (the homelab, when
  the inventory's ``ml.launcher`` is ``flyte``);
- :class:`~resources.flyte.LocalFlyteLauncher`: flytekit's local execution in a process of this
  machine (the twin without real nodes: not root, or Debian's containerd missing).

The task code (:mod:`homelab_dagster.ml`), the image and the weights store are the same for all
three.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import dagster as dg
from pydantic import Field

from homelab_dagster.errors import TrainingError
from homelab_dagster.inventory import Model, TrainingHyperparameters, TrainingRun
from homelab_dagster.ml.corpus import Corpus
from homelab_dagster.ml.spec import (
    Architecture,
    EvalReport,
    Hyperparameters,
    TrainReport,
    TrainSpec,
)

__all__ = ["GpuRequest", "TrainingLaunch", "TrainingLauncher", "TrainingOutcome"]


@dataclass(frozen=True)
class GpuRequest:
    """What the run's training task asks of its cluster."""

    nodes: int
    gpus_per_node: int
    memory: str
    product: str | None

    def describe(self) -> str:
        """``2 x nvidia.com/gpu (NVIDIA-A100-SXM4-40GB), 200Gi``."""
        product = f" ({self.product})" if self.product else ""
        nodes = f"{self.nodes} nodes x " if self.nodes > 1 else ""
        return f"{nodes}{self.gpus_per_node} x nvidia.com/gpu{product}, {self.memory}"


@dataclass(frozen=True)
class TrainingLaunch:
    """Everything a launcher needs: the run, what to train, on what, with which resources."""

    run: str
    spec: TrainSpec
    corpus: Corpus
    gpu: GpuRequest
    fingerprint: str
    cluster: str = ""
    node_role: str = "training"
    tolerations: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class TrainingOutcome:
    """A finished execution: where it ran, what it measured and where the weights are."""

    execution_id: str
    execution_url: str
    weights_uri: str
    weights_digest: str
    weights_size_bytes: int
    train: TrainReport
    evaluation: EvalReport
    duration_s: float
    # Where it ran, when a launcher knows: the pod and node (Kubernetes), the ranks, and the
    # GPUs it held times the time its containers ran.
    pod: str | None = None
    node: str | None = None
    nodes: tuple[str, ...] = ()  # every node the run's pods ran on (node rank 0's first)
    world_size: int = 1
    gpu_seconds: float = 0.0


class TrainingLauncher(dg.ConfigurableResource, ABC):
    """Runs a training run somewhere and waits for its outcome."""

    corpus_root: str = Field(description="The directory the runs' corpus globs are relative to.")
    scaled_down: bool = Field(
        default=False,
        description="Train the run's twin_hyperparameters from the model's architecture (a "
        "twin's CPUs), not its hyperparameters from its base model (the homelab's GPUs).",
    )

    def spec_for(self, model_name: str, model: Model, run: TrainingRun) -> TrainSpec:
        """What this target trains for ``run`` (its identity; see :class:`TrainSpec`)."""
        if self.scaled_down:
            return _spec(model_name, model, run.twin_hyperparameters or run.hyperparameters, None)
        return _spec(model_name, model, run.hyperparameters, model.base_model)

    @abstractmethod
    def launch(self, context: dg.AssetExecutionContext, launch: TrainingLaunch) -> TrainingOutcome:
        """Run ``launch`` and wait; progress goes to ``context.log``.

        Raises:
            TrainingError: the run could not start, failed or timed out.
        """


def _spec(
    name: str, model: Model, hp: TrainingHyperparameters, base_model: str | None
) -> TrainSpec:
    """The :class:`TrainSpec` of inventory entries (the ml package knows no pydantic)."""
    arch = model.architecture
    try:
        return TrainSpec(
            model=name,
            hyperparameters=Hyperparameters(**hp.model_dump()),
            architecture=Architecture(**arch.model_dump(exclude={"family"})) if arch else None,
            base_model=base_model,
        )
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
