"""The Flyte tasks of a training run, each a thin shell around :mod:`homelab_dagster.ml`.

These module-level tasks carry no resources: they are what a task container loads
(flytekit's default resolver imports this module and takes the task by name) and what
local execution runs. :func:`homelab_dagster.workflows.training.build_training_workflow`
makes copies of them with a run's GPU, memory, accelerator and image for registration;
the copies run the same functions.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NamedTuple

from flytekit import current_context, task
from flytekit.types.directory import FlyteDirectory

from homelab_dagster.ml import data as ml_data
from homelab_dagster.ml import train as ml_train
from homelab_dagster.ml.spec import EvalReport, TrainOptions, TrainReport, TrainSpec

__all__ = ["ExportOutputs", "TrainOutputs", "evaluate", "export", "prepare_dataset", "train"]


class TrainOutputs(NamedTuple):
    """What :func:`train` returns: a checkpoint directory and the loop's report."""

    checkpoint: FlyteDirectory
    report: TrainReport


class ExportOutputs(NamedTuple):
    """What :func:`export` returns: Hugging Face weights, their digest and size in bytes."""

    weights: FlyteDirectory
    digest: str
    size_bytes: int


def _workdir(name: str) -> Path:
    """A fresh directory for this task's outputs (Flyte's per-execution working directory)."""
    path = Path(current_context().working_directory) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _progress() -> None:
    """Send the training code's progress to stdout, which the launcher streams to Dagster."""
    logger = logging.getLogger("homelab_dagster.ml")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@task
def prepare_dataset(corpus: FlyteDirectory, spec: TrainSpec) -> FlyteDirectory:
    """Tokenise the corpus (a tokenizer trained on it, or the base model's) into blocks."""
    _progress()
    corpus.download()
    out = _workdir("dataset")
    info = ml_data.prepare_dataset(corpus.path, out, spec)
    logging.getLogger("homelab_dagster.ml").info(
        f"dataset: {info.tokens} tokens, {info.train_blocks} training and {info.eval_blocks} "
        f"held-out blocks of {info.seq_len}, vocabulary {info.vocab_size}"
    )
    return FlyteDirectory(str(out))


@task
def train(dataset: FlyteDirectory, spec: TrainSpec, options: TrainOptions) -> TrainOutputs:
    """Run the training function; return the checkpoint and the loop's report."""
    _progress()
    dataset.download()
    out = _workdir("checkpoint")
    report = ml_train.train_model(dataset.path, out, spec, options)
    return TrainOutputs(checkpoint=FlyteDirectory(str(out)), report=report)


@task
def evaluate(
    checkpoint: FlyteDirectory, dataset: FlyteDirectory, options: TrainOptions
) -> EvalReport:
    """Held-out loss and perplexity of the checkpoint."""
    _progress()
    checkpoint.download()
    dataset.download()
    report = ml_train.evaluate_model(checkpoint.path, dataset.path, options)
    logging.getLogger("homelab_dagster.ml").info(
        f"held-out loss {report.eval_loss:.4f}, perplexity {report.perplexity:.2f}"
    )
    return report


@task
def export(checkpoint: FlyteDirectory) -> ExportOutputs:
    """Hugging Face format weights (config, safetensors, tokenizer) and their digest."""
    _progress()
    checkpoint.download()
    out = _workdir("weights")
    digest, size = ml_train.export_model(checkpoint.path, out)
    return ExportOutputs(weights=FlyteDirectory(str(out)), digest=digest, size_bytes=size)
