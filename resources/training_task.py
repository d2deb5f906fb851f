"""A training pod's program: every rank of ``torchrun -m resources.training_task``.

The training pod (:mod:`resources.training_pods`) runs
``torchrun --standalone --nproc-per-node=<gpus_per_node> -m resources.training_task`` in the
training image (the project with its ``ml`` extra). Every rank joins the process group (NCCL on
GPUs, gloo on CPUs); rank 0 alone:

1. opens Dagster Pipes (its messages go to the container's log, which the Dagster step reads as
   it is written), so its log lines and its result arrive in Dagster as they happen;
2. prepares the dataset on the pod's scratch volume from the corpus that the pod's init
   container ``fetch-corpus`` copied there from the store (every file verified), and the
   other ranks of the pod read it (each pod of a run over several nodes: its local rank 0);
3. after the data-parallel training (:func:`homelab_dagster.ml.train.train_model`), evaluates,
   exports and stores the weights under their version's prefix (:meth:`WeightsStore.stage`:
   verified, not listed; ``model_weights/<model>`` lists them), and reports the result.

The request is the JSON of ``HOMELAB_TRAINING_REQUEST``::

    {"run": ..., "model": ..., "spec": {TrainSpec}, "options": {TrainOptions},
     "store": {"bucket": ..., "endpoint_url": ...}}

The store's keys come from ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (a Secret), the
Hugging Face token (a gated base model) from ``HF_TOKEN`` (a Secret): neither is in the request,
the log or the result. A failure's message is the container's last line, which Kubernetes
keeps as the pod's termination message.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from homelab_dagster.errors import HomelabError
from homelab_dagster.ml.spec import TrainOptions, TrainSpec, from_dict

__all__ = ["REQUEST_VAR", "RESULT_MESSAGE", "WORK_DIR_VAR", "main"]

REQUEST_VAR = "HOMELAB_TRAINING_REQUEST"
WORK_DIR_VAR = "HOMELAB_TRAINING_WORK_DIR"
# The key of the custom Pipes message that carries the result.
RESULT_MESSAGE = "homelab_training_result"


def _train(request: dict[str, Any], work: Path, log: Any) -> dict[str, Any] | None:
    """Every rank: the corpus and dataset (rank 0), the training, and (rank 0) the export into
    the store. Rank 0 returns the result; the others None."""
    from homelab_dagster.ml.data import prepare_dataset
    from homelab_dagster.ml.distributed import barrier, joined, world_from_env
    from homelab_dagster.ml.train import evaluate_model, export_model, train_model
    from resources.weights import WeightsStore

    spec = from_dict(TrainSpec, request["spec"])
    options = from_dict(TrainOptions, request["options"])
    store = request["store"]
    world = world_from_env()
    with joined(world):
        if world.local_rank == 0:  # each pod's scratch volume: its own copy, the same bytes
            info = prepare_dataset(work / "corpus", work / "dataset", spec)
        if world.is_main:
            hub = (
                "a Hugging Face token from its Secret" if os.environ.get("HF_TOKEN") else "offline"
            )
            nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
            log(
                f"dataset: {info.train_blocks} training and {info.eval_blocks} held-out blocks "
                f"of {info.seq_len} tokens from corpus {info.corpus_digest[:12]}; "
                f"{world.world_size} rank(s) ({world.backend}) in {nodes} pod(s); the hub: {hub}"
            )
        barrier(world)
        report = train_model(
            work / "dataset",
            work / "checkpoint",
            spec,
            options,
            log if world.is_main else None,
            world,
        )
        if not world.is_main:
            return None
        evaluation = evaluate_model(work / "checkpoint", work / "dataset", options)
        digest, size = export_model(work / "checkpoint", work / "weights")
        weights = WeightsStore(bucket=store["bucket"], endpoint_url=store["endpoint_url"])
        staged = weights.stage(request["model"], str(work / "weights"), expected_digest=digest)
        log(
            f"weights {digest[:12]} stored at {staged.uri} ({len(staged.files)} files, "
            f"{size / 2**20:.1f} MiB), held-out loss {evaluation.eval_loss:.3f}"
        )
        return {
            "weights_uri": staged.uri,
            "digest": digest,
            "size_bytes": size,
            "train": asdict(report),
            "evaluation": asdict(evaluation),
            "world_size": world.world_size,
        }


def main() -> int:
    """Run this rank; the exit status is the pod's."""
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    request = json.loads(os.environ[REQUEST_VAR])
    work = Path(os.environ.get(WORK_DIR_VAR, "/work"))
    main_rank = os.environ.get("RANK", "0") == "0"
    with ExitStack() as stack:
        pipes = (
            stack.enter_context(open_dagster_pipes())
            if main_rank and DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ
            else None
        )

        def log(line: str) -> None:
            if pipes is not None:
                pipes.log.info(line)
            print(line, flush=True)

        try:
            result = _train(request, work, log)
        except (HomelabError, OSError, RuntimeError, ValueError) as exc:
            # The container's last line: the pod's termination message.
            print(f"training failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            if pipes is not None:
                pipes.log.error(f"training failed: {exc}")
            return 1
        if pipes is not None and result is not None:
            pipes.report_custom_message({RESULT_MESSAGE: result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
