"""Flyte workflows of training runs: prepare dataset -> train -> evaluate -> export.

Importing this package imports flytekit (not torch): the orchestrator's resource imports
it only when it launches a run. The task bodies are :mod:`homelab_dagster.ml`'s functions.
"""

from homelab_dagster.workflows.training import (
    TaskResources,
    accelerator_for,
    build_training_workflow,
    workflow_name,
)

__all__ = ["TaskResources", "accelerator_for", "build_training_workflow", "workflow_name"]
