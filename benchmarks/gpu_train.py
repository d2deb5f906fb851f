"""GPU training throughput and model FLOPs utilisation of the training function, in bf16.

Runs :func:`homelab_dagster.ml.train.train_model` (the function the Flyte task calls) on
random GPT-2 models built from configuration (random init, synthetic tokens: throughput
does not depend on the text) for a fixed number of steps, and reports tokens per second
and MFU = 6 * N * tokens/s / peak, N the parameter count and peak the chip's dense bf16
rate (H100 SXM and H200: 989 TFLOP/s; A100: 312). ``mfu_with_attention`` adds the
attention term 12 * n_layer * seq_len * n_embd FLOPs per token.

Needs only torch, transformers, safetensors and tokenizers (no flytekit, no dagster):

    python3 benchmarks/gpu_train.py --out results.json [--configs medium,large,xl] [--steps 40]
    python3 benchmarks/gpu_train.py --configs tiny --device cpu --steps 6   # a dry run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from homelab_dagster.ml.data import synthetic_dataset
from homelab_dagster.ml.spec import (
    Architecture,
    Hyperparameters,
    TrainOptions,
    TrainSpec,
)
from homelab_dagster.ml.train import train_model

# name: (n_layer, n_head, n_embd, batch size); vocabulary 50304 (GPT-2's, padded to 64).
CONFIGS = {
    "tiny": (2, 4, 64, 4),
    "medium": (24, 16, 1024, 16),
    "large": (36, 20, 1280, 16),
    "xl": (48, 25, 1600, 8),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(name: str) -> float | None:
    """Dense bf16 peak of the GPU called ``name`` (None when unknown)."""
    return next((v for k, v in PEAK_BF16.items() if k in name.upper()), None)


def run(name: str, steps: int, seq_len: int, device: str, compile_: bool, work: Path) -> dict:
    """Train config ``name`` for ``steps`` steps and return its measurements."""
    import torch

    n_layer, n_head, n_embd, batch = CONFIGS[name]
    vocab = 512 if name == "tiny" else 50304
    seq = min(seq_len, 64) if name == "tiny" else seq_len
    spec = TrainSpec(
        model=f"gpt2-{name}",
        hyperparameters=Hyperparameters(
            steps=steps, batch_size=batch, seq_len=seq, learning_rate=3e-4
        ),
        architecture=Architecture(n_layer, n_head, n_embd, max(seq, 128), vocab),
    )
    data = work / f"data-{name}"
    synthetic_dataset(data, vocab, seq, blocks=max(64, 4 * batch))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    report = train_model(
        data,
        None,
        spec,
        TrainOptions(device=device, precision="auto", log_every=10, compile=compile_),
        log=lambda line: print(f"[{name}] {line}", flush=True),
    )
    result = {
        "config": name,
        "compile": compile_,
        "n_layer": n_layer,
        "n_embd": n_embd,
        "batch_size": batch,
        "seq_len": seq,
        "steps": steps,
        "parameters": report.parameter_count,
        "tokens_per_second": report.tokens_per_second,
        "first_loss": report.first_loss,
        "final_loss": report.final_loss,
        "precision": report.precision,
        "wall_s": time.perf_counter() - started,
    }
    if device == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = peak_flops(torch.cuda.get_device_name())
        if peak:
            flops = 6 * report.parameter_count
            attention = 12 * n_layer * seq * n_embd
            result["peak_tflops"] = peak / 1e12
            result["mfu"] = flops * report.tokens_per_second / peak
            result["mfu_with_attention"] = (flops + attention) * report.tokens_per_second / peak
    return result


def main() -> int:
    """Run the configs, print and save the results as JSON."""
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="medium,large,xl")
    parser.add_argument("--compiled", default="medium", help="configs also run with torch.compile")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
    }
    results: list[dict] = []
    plan = [(c, False) for c in args.configs.split(",") if c]
    plan += [(c, True) for c in args.compiled.split(",") if c]
    with tempfile.TemporaryDirectory() as work:
        for name, compile_ in plan:
            try:
                results.append(
                    run(name, args.steps, args.seq_len, args.device, compile_, Path(work))
                )
            except torch.cuda.OutOfMemoryError as exc:
                results.append(
                    {"config": name, "compile": compile_, "error": f"out of memory: {exc}"}
                )
            finally:
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            print(json.dumps(results[-1]), flush=True)
            if args.out:
                args.out.write_text(json.dumps({"environment": env, "results": results}, indent=2))
    print(json.dumps({"environment": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
