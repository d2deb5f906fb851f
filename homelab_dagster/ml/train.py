"""The training function and its neighbours: train, evaluate, export.

:func:`train_model` is *the* training function: the Flyte task calls it, the benchmarks
call it, and it needs only torch and transformers (no flytekit, no dagster). The four
steps a workflow runs are :func:`~homelab_dagster.ml.data.prepare_dataset`,
:func:`train_model`, :func:`evaluate_model` and :func:`export_model`;
:func:`run_pipeline` runs them in one process.

The loop: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up over a tenth
of the steps (at most 100) then cosine decay to a tenth of the rate, gradient clipping at
1.0, random training blocks drawn by a seeded generator, bf16 autocast on CUDA.

Data parallel (a :class:`~homelab_dagster.ml.distributed.World` of several ranks, under
torchrun): ``batch_size`` is the global batch. Every rank draws the same global batch from
the same seeded generator and trains on its contiguous slice; DistributedDataParallel
averages the gradients, so with equal slices the step is the one-rank step on the whole
batch (the mean of the slices' mean losses is the whole batch's mean loss). Rank 0 logs
and writes the checkpoint; every rank returns the report, whose losses are the ranks' mean.
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
from homelab_dagster.ml.distributed import World, barrier, joined, mean_across
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


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _rank_device(options: TrainOptions, world: World) -> torch.device:
    """The device of this rank: ``cuda:<local_rank>`` (made current) or the CPU."""
    device = resolve_device(options)
    if not world.distributed:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"local rank {world.local_rank} has no GPU: torch sees {torch.cuda.device_count()}"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif world.backend == "nccl":
        raise TrainingError("the nccl backend needs CUDA devices; CPU ranks use gloo")
    return device


def train_model(
    dataset_dir: str | Path,
    out_dir: str | Path | None,
    spec: TrainSpec,
    options: TrainOptions | None = None,
    log: LogFn | None = None,
    world: World | None = None,
) -> TrainReport:
    """Train ``spec``'s model on a prepared dataset; save a checkpoint to ``out_dir``.

    The checkpoint is a ``transformers`` directory (config, safetensors, tokenizer when
    the dataset has one) plus ``train_report.json``; ``out_dir=None`` keeps nothing
    (benchmarks). Progress goes to ``log`` every
    ``options.log_every`` steps. Tokens per second are measured after the first fifth of
    the steps (at most five), so start-up and compilation do not count.

    ``world`` (default: one rank) of several ranks trains data-parallel: each rank calls
    this with its own world (:func:`~homelab_dagster.ml.distributed.world_from_env`), joins
    the process group unless the caller already has, and takes its slice of the global
    ``batch_size``. Only rank 0 logs and writes ``out_dir``; every rank returns once the
    checkpoint is written.

    Raises:
        TrainingError: the dataset or spec is unusable, the batch does not split evenly
            over the ranks, the ranks cannot join, or the loss becomes NaN.
    """
    options = options or TrainOptions()
    world = world or World()
    log = (log or _log.info) if world.is_main else _quiet
    hp = spec.hyperparameters
    if hp.batch_size % world.world_size:
        raise TrainingError(
            f"batch_size {hp.batch_size} does not split evenly over world_size "
            f"{world.world_size} ranks"
        )
    with joined(world):
        return _train(dataset_dir, out_dir, spec, options, log, world)


def _train(
    dataset_dir: str | Path,
    out_dir: str | Path | None,
    spec: TrainSpec,
    options: TrainOptions,
    log: LogFn,
    world: World,
) -> TrainReport:
    hp = spec.hyperparameters
    train_blocks, _, info = load_dataset(dataset_dir)
    if info.seq_len != hp.seq_len:
        raise TrainingError(f"dataset has seq_len {info.seq_len}, the spec {hp.seq_len}")
    device = _rank_device(options, world)
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
    wrapped = model
    if world.distributed:  # averages the gradients over the ranks in backward()
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(wrapped) if options.compile else wrapped
    blocks = train_blocks.to(device)
    generator = torch.Generator().manual_seed(hp.seed)
    losses = torch.zeros(hp.steps, device=device)
    tokens_per_step = hp.batch_size * hp.seq_len  # global: all ranks together
    share = hp.batch_size // world.world_size
    mine = slice(world.rank * share, (world.rank + 1) * share)
    skip = min(5, hp.steps // 5)
    ranks = f" x {world.world_size} ranks ({world.backend})" if world.distributed else ""
    log(
        f"training {spec.model}: {params:,} parameters, {hp.steps} steps of "
        f"{hp.batch_size}x{hp.seq_len} tokens on {device.type}{ranks} ({precision})"
    )
    started = steady = time.perf_counter()
    for step in range(hp.steps):
        if step == skip:
            _sync(device)
            steady = time.perf_counter()
        # Every rank draws the whole global batch (same generator, same seed), then slices.
        index = torch.randint(len(blocks), (hp.batch_size,), generator=generator)[mine]
        batch = blocks[index.to(device)].long()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses[step] = loss.detach()
        if options.log_every and ((step + 1) % options.log_every == 0 or step + 1 == hp.steps):
            value = mean_across(loss.detach(), world).item()  # every rank: all see one value
            if not math.isfinite(value):
                raise TrainingError(f"the training loss is {value} at step {step + 1}")
            log(f"step {step + 1}/{hp.steps} loss {value:.4f} lr {schedule.get_last_lr()[0]:.2e}")
    _sync(device)
    ended = time.perf_counter()
    values = [float(v) for v in mean_across(losses, world).cpu()]
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
        world_size=world.world_size,
    )
    log(
        f"trained: loss {report.first_loss:.4f} -> {report.final_loss:.4f}, "
        f"{report.tokens_per_second:,.0f} tokens/s"
    )
    if out_dir is None:
        return report
    if world.is_main:
        _save(model, tokenizer, report, Path(out_dir))
    barrier(world)  # no rank returns before the checkpoint is complete
    return report


def _save(model: Any, tokenizer: Any, report: TrainReport, out: Path) -> None:
    """Write the checkpoint: ``model`` is the bare model, never its DDP wrapper."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # LoRA: the checkpoint holds merged weights
        model = model.merge_and_unload()
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    (out / REPORT_FILE).write_text(json.dumps(asdict(report)))


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
    """Mean next-token loss (nats) of a checkpoint over the dataset's held-out blocks.

    Beside it, the unigram baseline over the same predicted tokens (every block's positions
    1 to ``seq_len - 1``): the loss of always predicting the training split's token
    frequencies, add-one smoothed over the vocabulary.
    """
    options = options or TrainOptions()
    device = resolve_device(options)
    precision = resolve_precision(options, device)
    train_blocks, held_out, info = load_dataset(dataset_dir)
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
    return EvalReport(
        eval_loss=mean,
        perplexity=math.exp(min(mean, 700.0)),
        eval_tokens=count,
        unigram_loss=_unigram_loss(train_blocks, held_out, info.vocab_size),
    )


def _unigram_loss(train_blocks: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of ``held_out``'s predicted tokens under the unigram
    distribution of ``train_blocks`` (add-one smoothed over ``vocab_size``)."""
    train = train_blocks.flatten().long()
    targets = held_out[:, 1:].flatten().long()
    size = max(vocab_size, int(train.max()) + 1, int(targets.max()) + 1)
    counts = torch.bincount(train, minlength=size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return float(-log_probs[targets].mean())


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
