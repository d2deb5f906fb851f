"""CPU training throughput of the training function, against a bare loop over the same model.

Trains the twin's model (the inventory's architecture, its ``twin_hyperparameters``' batch
and sequence length) on synthetic tokens with :func:`homelab_dagster.ml.train.train_model`,
and, alternately, with a minimal loop (same model, AdamW, no schedule, no clipping, no
bookkeeping) in the same process; reports the medians of tokens per second and their
ratio (the loop's overhead: target at least 0.9), for one thread and for every core.

    uv run python benchmarks/train_throughput.py [--steps 60] [--repeat 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from homelab_dagster.loader import load_inventory
from homelab_dagster.ml.data import load_dataset, synthetic_dataset
from homelab_dagster.ml.model import build_model
from homelab_dagster.ml.spec import Architecture, Hyperparameters, TrainOptions, TrainSpec
from homelab_dagster.ml.train import train_model

ROOT = Path(__file__).resolve().parent.parent


def twin_spec(steps: int) -> TrainSpec:
    """The shipped inventory's first trained model and run, as the twin trains them."""
    inventory = load_inventory(ROOT / "homelab.yaml").inventory
    run = next(iter(inventory.training_runs.values()))
    arch = inventory.models[run.model].architecture
    hp = (run.twin_hyperparameters or run.hyperparameters).model_copy(update={"steps": steps})
    assert arch is not None, f"{run.model} has no architecture"
    return TrainSpec(
        model=run.model,
        hyperparameters=Hyperparameters(**hp.model_dump()),
        architecture=Architecture(**arch.model_dump(exclude={"family"})),
    )


def bare_loop(data: Path, spec: TrainSpec) -> float:
    """Tokens per second of the least a training loop can do, timed like train_model."""
    hp = spec.hyperparameters
    blocks, _, _ = load_dataset(data)
    model = build_model(spec, spec.architecture.vocab_size, 0)  # type: ignore[union-attr]
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate)
    generator = torch.Generator().manual_seed(0)
    skip = min(5, hp.steps // 5)
    started = time.perf_counter()
    for step in range(hp.steps):
        if step == skip:
            started = time.perf_counter()
        batch = blocks[torch.randint(len(blocks), (hp.batch_size,), generator=generator)].long()
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (hp.steps - skip) * hp.batch_size * hp.seq_len / (time.perf_counter() - started)


def main() -> int:
    """Measure, print a table and optionally save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = twin_spec(args.steps)
    arch, hp = spec.architecture, spec.hyperparameters
    assert arch is not None
    rows = []
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        synthetic_dataset(data, arch.vocab_size, hp.seq_len, blocks=256)
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            ours, bare = [], []
            for _ in range(args.repeat):
                options = TrainOptions(device="cpu", precision="fp32", log_every=0, threads=threads)
                ours.append(
                    train_model(data, None, spec, options, log=lambda _: None).tokens_per_second
                )
                bare.append(bare_loop(data, spec))
            row = {
                "threads": threads,
                "train_model_tokens_per_s": statistics.median(ours),
                "bare_loop_tokens_per_s": statistics.median(bare),
            }
            row["ratio"] = row["train_model_tokens_per_s"] / row["bare_loop_tokens_per_s"]
            rows.append(row)
    print(
        f"{spec.model}: {arch.n_layer} layers x {arch.n_embd}, batch {hp.batch_size} x {hp.seq_len}"
    )
    print(f"{'threads':>7} {'train_model tok/s':>18} {'bare loop tok/s':>16} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['threads']:>7} {row['train_model_tokens_per_s']:>18,.0f} "
            f"{row['bare_loop_tokens_per_s']:>16,.0f} {row['ratio']:>6.2f}"
        )
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
