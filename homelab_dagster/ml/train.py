"""The training function and its neighbours: train, evaluate, export.

:func:`train_model` is *the* training function: the Flyte task calls it, the benchmarks
call it, and it needs only torch and transformers (no flytekit, no dagster). The four
steps a workflow runs are :func:`~homelab_dagster.ml.data.prepare_dataset`,
:func:`train_model`, :func:`evaluate_model` and :func:`export_model`;
:func:`run_pipeline` runs them in one process.

The loop: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up over a tenth
of the steps (at most 100) then cosine decay to a tenth of the rate, gradient clipping at
1.0, random training blocks drawn by a seeded generator, bf16 autocast on CUDA.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from homelab_dagster.errors import TrainingError
from homelab_dagster.ml.data import load_dataset, prepare_dataset, tokenizer_dir
from homelab_dagster.ml.digest import directory_digest
from homelab_dagster.ml.model import (
    build_model,
    parameter_count,
    quiet_loss_type,
    resolve_device,
    resolve_precision,
)
from homelab_dagster.ml.spec import EvalReport, TrainOptions, TrainReport, TrainSpec

__all__ = ["LogFn", "evaluate_model", "export_model", "run_pipeline", "train_model"]

LogFn = Callable[[str], None]
REPORT_FILE = "train_report.json"
_log = logging.getLogger("homelab_dagster.ml")


def _lr_factor(steps: int) -> Callable[[int], float]:
    warmup = max(1, min(100, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_model(
    dataset_dir: str | Path,
    out_dir: str | Path | None,
    spec: TrainSpec,
    options: TrainOptions | None = None,
    log: LogFn | None = None,
) -> TrainReport:
    """Train ``spec``'s model on a prepared dataset; save a checkpoint to ``out_dir``.

    The checkpoint is a ``transformers`` directory (config, safetensors, tokenizer when
    the dataset has one) plus ``train_report.json``; ``out_dir=None`` keeps nothing
    (benchmarks). Progress goes to ``log`` every
    ``options.log_every`` steps. Tokens per second are measured after the first fifth of
    the steps (at most five), so start-up and compilation do not count.

    Raises:
        TrainingError: the dataset or spec is unusable, or the loss becomes NaN.
    """
    options = options or TrainOptions()
    log = log or _log.info
    hp = spec.hyperparameters
    train_blocks, _, info = load_dataset(dataset_dir)
    if info.seq_len != hp.seq_len:
        raise TrainingError(f"dataset has seq_len {info.seq_len}, the spec {hp.seq_len}")
    device = resolve_device(options)
    precision = resolve_precision(options, device)
    if options.threads:
        torch.set_num_threads(options.threads)
    tokenizer = None
    eos = 0
    if info.has_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(dataset_dir)))
        eos = tokenizer.eos_token_id
    model = build_model(spec, info.vocab_size, eos).to(device)
    model.train()
    params = parameter_count(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=hp.learning_rate, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(hp.steps))
    forward = torch.compile(model) if options.compile else model
    blocks = train_blocks.to(device)
    generator = torch.Generator().manual_seed(hp.seed)
    losses = torch.zeros(hp.steps, device=device)
    tokens_per_step = hp.batch_size * hp.seq_len
    skip = min(5, hp.steps // 5)
    log(
        f"training {spec.model}: {params:,} parameters, {hp.steps} steps of "
        f"{hp.batch_size}x{hp.seq_len} tokens on {device.type} ({precision})"
    )
    started = steady = time.perf_counter()
    for step in range(hp.steps):
        if step == skip:
            _sync(device)
            steady = time.perf_counter()
        index = torch.randint(len(blocks), (hp.batch_size,), generator=generator).to(device)
        batch = blocks[index].long()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses[step] = loss.detach()
        if options.log_every and ((step + 1) % options.log_every == 0 or step + 1 == hp.steps):
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingError(f"the training loss is {value} at step {step + 1}")
            log(f"step {step + 1}/{hp.steps} loss {value:.4f} lr {schedule.get_last_lr()[0]:.2e}")
    _sync(device)
    ended = time.perf_counter()
    values = [float(v) for v in losses.cpu()]
    if not all(math.isfinite(v) for v in values):
        raise TrainingError("the training loss became NaN or infinite")
    steady_tokens = (hp.steps - skip) * tokens_per_step
    report = TrainReport(
        steps=hp.steps,
        losses=[round(v, 5) for v in values],
        first_loss=values[0],
        final_loss=sum(values[-5:]) / len(values[-5:]),
        parameter_count=params,
        tokens_seen=hp.steps * tokens_per_step,
        train_seconds=ended - started,
        tokens_per_second=steady_tokens / max(ended - steady, 1e-9),
        device=device.type,
        precision=precision,
    )
    log(
        f"trained: loss {report.first_loss:.4f} -> {report.final_loss:.4f}, "
        f"{report.tokens_per_second:,.0f} tokens/s"
    )
    if out_dir is None:
        return report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # LoRA: the checkpoint holds merged weights
        model = model.merge_and_unload()
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    (out / REPORT_FILE).write_text(json.dumps(asdict(report)))
    return report


def _load(checkpoint_dir: str | Path, device: torch.device | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any
    try:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the checkpoint at {checkpoint_dir}: {exc}") from exc
    quiet_loss_type(model)
    return model.to(device) if device is not None else model


@torch.no_grad()
def evaluate_model(
    checkpoint_dir: str | Path,
    dataset_dir: str | Path,
    options: TrainOptions | None = None,
    batch_size: int = 8,
) -> EvalReport:
    """Mean next-token loss (nats) of a checkpoint over the dataset's held-out blocks."""
    options = options or TrainOptions()
    device = resolve_device(options)
    precision = resolve_precision(options, device)
    _, held_out, _ = load_dataset(dataset_dir)
    model = _load(checkpoint_dir, device).eval()
    total, count = 0.0, 0
    for start in range(0, len(held_out), batch_size):
        batch = held_out[start : start + batch_size].to(device).long()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        predicted = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * predicted
        count += predicted
    mean = total / count
    return EvalReport(eval_loss=mean, perplexity=math.exp(min(mean, 700.0)), eval_tokens=count)


def export_model(checkpoint_dir: str | Path, out_dir: str | Path) -> tuple[str, int]:
    """Write Hugging Face format weights (config, safetensors, tokenizer) to ``out_dir``.

    Returns the directory's digest (:mod:`homelab_dagster.ml.digest`) and size in bytes.
    ``out_dir`` must be empty or absent: the digest covers exactly what is exported.
    """
    from transformers import AutoTokenizer

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"export directory {out} is not empty")
    model = _load(checkpoint_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    if (Path(checkpoint_dir) / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(str(checkpoint_dir)).save_pretrained(str(out))
    digest, _, size = directory_digest(out)
    return digest, size


def run_pipeline(
    corpus_dir: str | Path,
    work_dir: str | Path,
    spec: TrainSpec,
    options: TrainOptions | None = None,
    log: LogFn | None = None,
) -> tuple[Path, str, TrainReport, EvalReport]:
    """Prepare, train, evaluate and export in this process (what the workflow does).

    Returns ``(weights directory, digest, train report, eval report)``.
    """
    work = Path(work_dir)
    for part in ("dataset", "checkpoint", "weights"):
        shutil.rmtree(work / part, ignore_errors=True)
    prepare_dataset(corpus_dir, work / "dataset", spec)
    report = train_model(work / "dataset", work / "checkpoint", spec, options, log)
    evaluation = evaluate_model(work / "checkpoint", work / "dataset", options)
    digest, _ = export_model(work / "checkpoint", work / "weights")
    return work / "weights", digest, report, evaluation
