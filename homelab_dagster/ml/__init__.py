"""Training code: corpus, tokenizer, dataset, GPT-2-style model, train loop, eval, export.

Pure torch and transformers: nothing here imports dagster or flytekit, so a bare GPU
machine runs it. Importing this package is cheap; torch and transformers load only when
a name that needs them is first used (the Dagster code location imports
:mod:`homelab_dagster.ml.corpus` and :mod:`homelab_dagster.ml.spec` and never torch).

Modules: ``spec`` (dataclasses, fingerprint), ``digest`` (the weights digest), ``corpus``
(globs to files), ``tokenizer``, ``data`` (dataset directories), ``model``, ``train``
(the training function and the evaluate and export steps), ``distributed`` (the ranks of a
data-parallel run under torchrun).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Architecture",
    "Corpus",
    "EvalReport",
    "Hyperparameters",
    "TrainOptions",
    "TrainReport",
    "TrainSpec",
    "World",
    "barrier",
    "code_version",
    "directory_digest",
    "evaluate_model",
    "export_model",
    "fingerprint",
    "joined",
    "mean_across",
    "prepare_dataset",
    "resolve_corpus",
    "run_pipeline",
    "synthetic_dataset",
    "train_model",
    "world_from_env",
]

_HOMES = {
    "Architecture": "spec",
    "EvalReport": "spec",
    "Hyperparameters": "spec",
    "TrainOptions": "spec",
    "TrainReport": "spec",
    "TrainSpec": "spec",
    "code_version": "spec",
    "fingerprint": "spec",
    "directory_digest": "digest",
    "Corpus": "corpus",
    "resolve_corpus": "corpus",
    "prepare_dataset": "data",
    "synthetic_dataset": "data",
    "evaluate_model": "train",
    "export_model": "train",
    "run_pipeline": "train",
    "train_model": "train",
    "World": "distributed",
    "barrier": "distributed",
    "joined": "distributed",
    "mean_across": "distributed",
    "world_from_env": "distributed",
}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (keeps torch out until needed)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
