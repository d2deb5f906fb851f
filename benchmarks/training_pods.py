"""The twin's training run as a pod against the same run as a local process, same steps, same
machine, same run; and two ranks against one.

Against a running twin whose Forge is provisioned with its training node real (``make up``),
with that twin's environment (``HOMELAB_STATE_DIR``, ``HOMELAB_TWIN_PORT_BASE``). Three runs
of the shipped ``sre-runbook`` at its twin hyperparameters (a seed of their own, so nothing is
reused), one after the other:

- **pod**: ``training_run/sre-runbook`` materialised with the deployment's
  ``PodTrainingLauncher``: the corpus into the store, the Secret, the pod scheduled on
  ``forge-training-primary``, its copy step, ``torchrun`` with 2 ranks, the weights back into
  the store, the pod deleted: the step's wall time;
- **local, 2 ranks**: the pod's own program (``torchrun -m resources.training_task``) run on
  this machine with the corpus staged locally and the same store: its wall time;
- **local, 1 rank**: the same with one rank.

Overhead = pod - local (2 ranks); target under 20 s. Ranks: local 2 ranks / local 1 rank.

    uv run python benchmarks/training_pods.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import save

from homelab_dagster.loader import load_inventory
from homelab_dagster.ml.corpus import resolve_corpus
from homelab_dagster.ml.spec import TrainOptions
from homelab_dagster.settings import Settings
from resources.deployment import build_deployment
from resources.training_pods import PodTrainingLauncher
from resources.training_task import REQUEST_VAR, WORK_DIR_VAR

RUN = "sre-runbook"


def _pod_run(resources: dict, inventory, run) -> tuple[float, dict]:
    import dagster as dg

    from assets.training import build_training_run_defs

    defs = build_training_run_defs(
        RUN, run, inventory.models[run.model], inventory.clusters[run.cluster]
    )
    started = time.monotonic()
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            list(defs.assets or []), resources=resources, instance=instance, raise_on_error=False
        )
    seconds = time.monotonic() - started
    if not result.success:
        raise SystemExit("the pod's run failed: " + str(result.all_events[-1].message))
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    return seconds, metadata


def _local_run(launcher: PodTrainingLauncher, spec, corpus, ranks: int, store: dict) -> float:
    """The pod's program on this machine: torchrun over resources.training_task."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        corpus.stage(work / "corpus")
        options = TrainOptions(device="cpu", precision="fp32", log_every=100, threads=1)
        request = {
            "run": RUN,
            "model": spec.model,
            "spec": asdict(spec),
            "options": asdict(options),
            "store": store,
        }
        key, secret = launcher.weights_store.access_keys()
        env = {
            **os.environ,
            REQUEST_VAR: json.dumps(request),
            WORK_DIR_VAR: str(work),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
        }
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={ranks}", "-m", "resources.training_task",
        ]  # fmt: skip
        started = time.monotonic()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.monotonic() - started


def main() -> int:
    settings = Settings.from_env()
    inventory = load_inventory(settings.inventory_path).inventory
    resources = build_deployment(settings, inventory).resources
    launcher = resources["training"]
    if not isinstance(launcher, PodTrainingLauncher):
        raise SystemExit("training runs in a local process here (not root): no pod to measure")
    shipped = inventory.training_runs[RUN]
    assert shipped.twin_hyperparameters is not None
    seed = int(time.time()) % 100_000
    hp = shipped.twin_hyperparameters.model_copy(update={"seed": seed})
    run = shipped.model_copy(update={"twin_hyperparameters": hp})
    spec = launcher.spec_for(run.model, inventory.models[run.model], run)
    corpus = resolve_corpus(launcher.corpus_root, run.corpus)
    store = {
        "bucket": launcher.weights_store.bucket,
        "endpoint_url": launcher.weights_store.endpoint_url,
    }

    pod_s, metadata = _pod_run(resources, inventory, run)
    print(f"pod: {pod_s:.1f} s (train {metadata.get('duration_s')} s in the launcher)")
    two = _local_run(launcher, spec, corpus, 2, store)
    print(f"local, 2 ranks: {two:.1f} s")
    one = _local_run(launcher, spec, corpus, 1, store)
    print(f"local, 1 rank: {one:.1f} s")
    report = {
        "run": RUN,
        "steps": hp.steps,
        "batch_size": hp.batch_size,
        "seq_len": hp.seq_len,
        "seconds": {
            "pod": round(pod_s, 1),
            "local_2_ranks": round(two, 1),
            "local_1_rank": round(one, 1),
        },
        "pod_overhead_s": round(pod_s - two, 1),
        "two_ranks_over_one": round(two / one, 2),
        "gpu_seconds": metadata.get("gpu_seconds"),
        "node": metadata.get("node"),
        "target": "pod overhead under 20 s",
    }
    save("training_pods", report)
    return 0 if report["pod_overhead_s"] < 20 else 1


if __name__ == "__main__":
    sys.exit(main())
