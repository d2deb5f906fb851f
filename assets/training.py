"""``training_run/<run>``: trains a model on its cluster's GPUs.

Materialising the asset resolves the corpus (an empty one fails here, before anything is
launched), computes the run's fingerprint (corpus digest, spec, training code version)
and, when the weights store already holds a version with that fingerprint, reuses it
without training. Otherwise the training launcher runs it (:mod:`resources.training`: a pod
on the run's nodes on both targets, or Flyte), its weights go into the weights store
(stored and verified under their version's prefix, not listed yet), and the materialisation
records the pod or execution, the GPU-seconds and their ``s3://`` URI; ``model_weights/<model>``
registers them. The asset's pool (``gpu-<cluster>``) keeps two GPU steps from sharing a
cluster's GPUs at once. Metadata keys: docs/training.md.
"""

from dataclasses import asdict
from typing import Any

import dagster as dg

from assets._keys import INVENTORY_KEY, cluster_key, training_run_key
from assets._stack import provenance
from homelab_dagster.errors import TrainingError, WeightsError
from homelab_dagster.inventory import Cluster, Model, TrainingRun
from homelab_dagster.ml.corpus import resolve_corpus
from homelab_dagster.ml.spec import code_version, fingerprint
from homelab_dagster.weights import WeightsVersion
from resources.training import GpuRequest, TrainingLaunch, TrainingLauncher, TrainingOutcome
from resources.weights import StagedWeights, WeightsStore

__all__ = ["build_training_run_defs", "gpu_pool", "gpu_request"]


def gpu_pool(cluster: str) -> str:
    """The Dagster concurrency pool of ``cluster``'s GPU steps (one at a time by default)."""
    return f"gpu-{cluster}"


def gpu_request(run: TrainingRun, cluster: Cluster) -> GpuRequest:
    """The run's GPU request, with the product of its cluster's ``node_role`` nodes."""
    nodes = [n for n in cluster.expanded_nodes() if n.role == run.node_role and n.gpus]
    product = max(nodes, key=lambda n: n.gpus).gpu_product if nodes else None
    return GpuRequest(run.nodes, run.gpus_per_node, run.memory, product)


def _outcome_metadata(outcome: TrainingOutcome, stored: StagedWeights) -> dict[str, Any]:
    where = (
        {"pod": outcome.pod, "node": outcome.node, "nodes": ", ".join(outcome.nodes)}
        if outcome.pod
        else {}
    )
    return {
        "reused": False,
        "execution_id": outcome.execution_id,
        "execution_url": dg.MetadataValue.url(outcome.execution_url),
        **{k: v for k, v in where.items() if v},
        "world_size": outcome.world_size,
        "gpu_seconds": dg.MetadataValue.float(outcome.gpu_seconds),
        "duration_s": round(outcome.duration_s, 2),
        "train_steps": outcome.train.steps,
        "train_loss_first": outcome.train.first_loss,
        "train_loss_final": outcome.train.final_loss,
        "loss_curve": dg.MetadataValue.json(outcome.train.losses),
        "tokens_per_second": round(outcome.train.tokens_per_second, 1),
        "parameter_count": outcome.train.parameter_count,
        "eval_loss": outcome.evaluation.eval_loss,
        "perplexity": outcome.evaluation.perplexity,
        **(
            {"eval_unigram_loss": outcome.evaluation.unigram_loss}
            if outcome.evaluation.unigram_loss is not None
            else {}
        ),
        "weights_uri": stored.uri,
        "weights_digest": stored.digest,
        "weights_size_bytes": stored.size_bytes,
    }


def _reused_metadata(version: WeightsVersion) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "reused": True,
        "execution_id": version.execution_id or "",
        "weights_uri": version.uri,
        "weights_digest": version.digest,
        "weights_size_bytes": version.size_bytes,
        "registered_at": version.created_at,
    }
    if version.execution_url:
        metadata["execution_url"] = dg.MetadataValue.url(version.execution_url)
    if version.parameter_count is not None:
        metadata["parameter_count"] = version.parameter_count
    for name in ("train_loss_final", "eval_loss", "perplexity", "eval_unigram_loss"):
        if name in version.metrics:
            metadata[name] = version.metrics[name]
    return metadata


def build_training_run_defs(
    name: str, run: TrainingRun, model: Model, cluster: Cluster
) -> dg.Definitions:
    """The asset of training run ``name`` (of ``model``, on ``cluster``)."""
    key = training_run_key(name)
    gpu = gpu_request(run, cluster)

    @dg.asset(
        key=key,
        deps=[INVENTORY_KEY, cluster_key(run.cluster)],
        group_name="ml",
        kinds={"pytorch"},
        pool=gpu_pool(run.cluster),
        description=f"Trains {run.model} on {run.cluster} ({gpu.describe()}).",
        metadata={"model": run.model, "cluster": run.cluster, "gpu_request": gpu.describe()},
    )
    def _training_run(
        context: dg.AssetExecutionContext, training: TrainingLauncher, weights_store: WeightsStore
    ) -> dg.MaterializeResult:
        try:
            spec = training.spec_for(run.model, model, run)
            corpus = resolve_corpus(training.corpus_root, run.corpus)
            run_fingerprint = fingerprint(spec, corpus.digest, code_version())
            metadata: dict[str, Any] = {
                "fingerprint": run_fingerprint,
                "corpus_digest": corpus.digest,
                "corpus_files": len(corpus.files),
                "corpus_bytes": corpus.total_bytes,
                "code_version": code_version(),
                "spec": dg.MetadataValue.json(asdict(spec)),
                "gpu_request": gpu.describe(),
            }
            existing = weights_store.find(run.model, run_fingerprint)
            if existing is not None:
                context.log.info(
                    f"reusing {run.model} version {existing.digest[:12]} (registered "
                    f"{existing.created_at} from the same corpus, configuration and code, "
                    f"fingerprint {run_fingerprint[:12]}): not training"
                )
                metadata |= _reused_metadata(existing)
            else:
                launch = TrainingLaunch(
                    name,
                    spec,
                    corpus,
                    gpu,
                    run_fingerprint,
                    cluster=run.cluster,
                    node_role=run.node_role,
                    tolerations=cluster.tolerations(run.node_role),
                )
                outcome = training.launch(context, launch)
                context.log.info(
                    f"{outcome.execution_id}: loss {outcome.train.first_loss:.3f} -> "
                    f"{outcome.train.final_loss:.3f}, held-out {outcome.evaluation.eval_loss:.3f}, "
                    f"weights {outcome.weights_digest[:12]}"
                )
                # Into the weights store, verified (not listed: model_weights registers it).
                stored = weights_store.stage(
                    run.model, outcome.weights_uri, expected_digest=outcome.weights_digest
                )
                context.log.info(
                    f"weights stored at {stored.uri}: {len(stored.files)} files, "
                    f"{stored.size_bytes / 2**20:.1f} MiB"
                    + (f" ({stored.reused} already there)" if stored.reused else "")
                )
                metadata |= _outcome_metadata(outcome, stored)
        except (TrainingError, WeightsError) as exc:
            raise dg.Failure(
                description=f"{key.to_user_string()}: {exc}", allow_retries=False
            ) from exc
        return dg.MaterializeResult(
            metadata={**metadata, **provenance(context)},
            data_version=dg.DataVersion(run_fingerprint),
        )

    return dg.Definitions(assets=[_training_run])
