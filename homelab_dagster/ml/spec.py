"""What a training run is (its identity) and what it reports, as plain dataclasses.

These types cross every boundary of the training code: the Flyte workflow's inputs and
outputs, the JSON a local run hands back to the Dagster process, the weights store's
metadata. They depend on the standard library only, so a bare GPU machine with torch and
transformers imports them, and flytekit serialises them as dataclasses.

The *fingerprint* of a run (:func:`fingerprint`) is the digest of everything that decides
what the weights will be: the corpus' content digest, the :class:`TrainSpec` and the
training code's version (:func:`code_version`). Two runs with one fingerprint produce the
same model, so the second reuses the first's registered weights instead of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Architecture",
    "EvalReport",
    "Hyperparameters",
    "TrainOptions",
    "TrainReport",
    "TrainSpec",
    "code_version",
    "fingerprint",
    "from_dict",
]


@dataclass
class Architecture:
    """A GPT-2-style decoder trained from scratch (mirrors the inventory's ``architecture``)."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int


@dataclass
class Hyperparameters:
    """How the model is trained (mirrors the inventory's ``hyperparameters``)."""

    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    eval_fraction: float = 0.1
    seed: int = 0
    lora_rank: int | None = None


@dataclass
class TrainSpec:
    """The identity of a training run: a change here trains a new version.

    ``base_model`` (a Hugging Face id or a local directory) fine-tunes that model and uses
    its tokenizer; without it a model of ``architecture`` is trained from scratch with a
    byte-level BPE tokenizer built from the corpus.
    """

    model: str
    hyperparameters: Hyperparameters
    architecture: Architecture | None = None
    base_model: str | None = None

    def __post_init__(self) -> None:
        if self.architecture is None and not self.base_model:
            raise ValueError(f"{self.model}: a spec needs an architecture or a base model")


@dataclass
class TrainOptions:
    """How to run, not what to train: never part of the fingerprint.

    ``device`` is ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``;
    ``precision`` is ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
    """

    device: str = "auto"
    precision: str = "auto"
    log_every: int = 10
    threads: int = 0
    compile: bool = False


@dataclass
class TrainReport:
    """What the training loop measured.

    With several ranks (``world_size``) the losses are their mean and the tokens count
    every rank's: the figures of the one global batch.
    """

    steps: int
    losses: list[float]
    first_loss: float
    final_loss: float
    parameter_count: int
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float
    device: str
    precision: str
    world_size: int = 1


@dataclass
class EvalReport:
    """Held-out evaluation: mean next-token loss (nats) and its perplexity.

    ``unigram_loss`` is the baseline over the same tokens: the cross-entropy of the training
    split's token frequencies (add-one smoothed over the vocabulary). A model whose
    ``eval_loss`` is below it has learned more than which tokens are common.
    """

    eval_loss: float
    perplexity: float
    eval_tokens: int
    unigram_loss: float | None = None


def from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``data`` (nested dataclasses included); unknown keys fail."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    nested = {"architecture": Architecture, "hyperparameters": Hyperparameters}
    for name, value in data.items():
        target = nested.get(name) if cls is TrainSpec else None
        kwargs[name] = from_dict(target, value) if target and isinstance(value, dict) else value
    return cls(**kwargs)


_CODE_FILES = ("spec.py", "corpus.py", "tokenizer.py", "data.py", "model.py", "train.py")


def code_version() -> str:
    """sha256 of the training code's sources (this package's modules that shape the weights)."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _CODE_FILES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return digest.hexdigest()


def fingerprint(spec: TrainSpec, corpus_digest: str, code: str | None = None) -> str:
    """The digest of a run's identity: corpus content, spec and training code version."""
    identity = {
        "corpus": corpus_digest,
        "spec": dataclasses.asdict(spec),
        "code": code or code_version(),
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
