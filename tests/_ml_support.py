"""Helpers shared by the ML tests: a small corpus, the twin's tiny spec, the ``ml`` extra.

Tests that need the ``ml`` extra (torch, transformers, ...) carry :data:`needs_ml`: they
skip, saying why, where it is not installed. In CI they must not skip: ``conftest.py``
fails the session there when :func:`missing_ml_modules` names anything.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from pathlib import Path

import pytest

from homelab_dagster.ml.spec import Architecture, Hyperparameters, TrainOptions, TrainSpec

ROOT = Path(__file__).resolve().parent.parent


def missing_ml_modules() -> list[str]:
    """The packages of pyproject.toml's ``ml`` extra that cannot be imported here.

    Their distribution names are their module names (torch, transformers, ...).
    """
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = extras["optional-dependencies"]["ml"]
    names = [re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0] for r in requirements]
    return [n for n in names if importlib.util.find_spec(n.replace("-", "_")) is None]


_MISSING = missing_ml_modules()
needs_ml = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"needs the ml extra (uv sync --extra ml); not installed: {', '.join(_MISSING)}",
)

# Hugging Face must never be reached: every test process and its children are offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = Architecture(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=512)
# One thread: the test machine's two cores are shared with Go builds.
CPU = TrainOptions(device="cpu", precision="fp32", log_every=0, threads=1)


def tiny_spec(steps: int = 60, learning_rate: float = 3e-3, seed: int = 0) -> TrainSpec:
    """The twin's run, as the shipped inventory declares it (60 steps of 8 x 64 tokens)."""
    return TrainSpec(
        model="sre-agent",
        hyperparameters=Hyperparameters(
            steps=steps, batch_size=8, seq_len=64, learning_rate=learning_rate, seed=seed
        ),
        architecture=TINY,
    )


def write_corpus(root: Path) -> Path:
    """A corpus of the project's own prose (README and docs) under ``root``."""
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for source in sources:
        if source.is_file():
            target = root / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    runbook = root / "docs" / "runbook.md"
    runbook.parent.mkdir(parents=True, exist_ok=True)
    runbook.write_text(
        "\n".join(
            f"Step {i}: when the {svc} pod on {cluster} restarts, check its logs, the node's "
            f"memory pressure and the last Flux reconcile before paging the on-call engineer."
            for i, (svc, cluster) in enumerate(
                [
                    (s, c)
                    for s in ("vllm", "grafana", "flyte", "mlflow")
                    for c in ("forge", "studio")
                ]
                * 6
            )
        ),
        encoding="utf-8",
    )
    return root
