"""``model_weights/<model>``: the versions of a model's weights, in the weights store.

A trained model's asset registers the weights of its newest training run materialisation
(read from that materialisation's metadata: the data flows one way, training_run ->
model_weights) as a version addressed by their digest, then promotes it to current unless
its held-out loss regresses: the blocking check ``eval_loss_regression`` fails, the
version stays listed but not current, and nothing downstream (the endpoint) runs.
The data version is the weights' digest, so the asset's history in the UI is the
history of versions. Materialising with the config ``rollback_to: <digest>`` makes an
older version current instead (recorded as a materialisation of that version).

An external model (``source: external``) is an observable source asset: observing it
reads the store's current version where one was put there, and otherwise reports the
base model's id; nothing is downloaded.
"""

import hashlib
import re
import warnings
from collections.abc import Mapping
from typing import Any

import dagster as dg

from assets._keys import model_weights_key, training_run_key
from homelab_dagster.errors import WeightsError
from homelab_dagster.inventory import Model, TrainingRun
from resources.weights import WeightsStore, WeightsVersion

__all__ = ["CHECK_NAME", "WeightsConfig", "build_model_weights_defs", "regression_verdict"]

CHECK_NAME = "eval_loss_regression"


def regression_verdict(
    candidate: WeightsVersion, current: WeightsVersion | None, margin: float
) -> tuple[bool, str, dict[str, Any]]:
    """Whether ``candidate`` may replace ``current``: its held-out loss is at most
    ``current``'s times ``1 + margin``. Returns (passed, description, metadata)."""
    observed = candidate.eval_loss
    metadata: dict[str, Any] = {"margin": margin, "candidate": candidate.digest}
    if observed is not None:
        metadata["observed_eval_loss"] = observed
    if current is None:
        return True, "no current version yet", metadata
    if current.digest == candidate.digest:
        return True, "this version is the current one", metadata
    metadata["current"] = current.digest
    if observed is None or current.eval_loss is None:
        return True, "one of the versions has no held-out loss to compare", metadata
    allowed = current.eval_loss * (1 + margin)
    metadata |= {"current_eval_loss": current.eval_loss, "max_allowed_eval_loss": allowed}
    if observed <= allowed:
        return True, f"held-out loss {observed:.4f} <= {allowed:.4f}", metadata
    return (
        False,
        f"held-out loss {observed:.4f} is worse than the current version's "
        f"{current.eval_loss:.4f} by more than {margin:.0%} (allowed {allowed:.4f})",
        metadata,
    )


def _value(event: dg.EventLogEntry, name: str) -> object:
    materialization = event.asset_materialization
    entry = materialization.metadata.get(name) if materialization else None
    return entry.value if entry is not None else None


def _version_metadata(
    version: WeightsVersion,
    *,
    source_run: str,
    metrics: Mapping[str, float],
    new: bool,
    promoted: bool,
    current: WeightsVersion | None,
    versions: list[WeightsVersion],
) -> dict[str, Any]:
    """The metadata a ``model_weights`` materialisation records (docs/metadata.md)."""
    return {
        "digest": version.digest,
        "weights_uri": version.uri,
        "size_bytes": version.size_bytes,
        "parameter_count": version.parameter_count or 0,
        "source_run": source_run,
        "execution_id": version.execution_id or "",
        **metrics,
        "new_version": new,
        "promoted": promoted,
        "current_digest": current.digest if current else "",
        "version_count": len(versions),
        "versions": dg.MetadataValue.md(_history_table(versions, current)),
    }


def _history_table(versions: list[WeightsVersion], current: WeightsVersion | None) -> str:
    rows = ["| digest | created | run | eval loss | current |", "|---|---|---|---|---|"]
    for v in reversed(versions):
        loss = f"{v.eval_loss:.4f}" if v.eval_loss is not None else ""
        mark = "yes" if current and v.digest == current.digest else ""
        rows.append(
            f"| `{v.digest[:12]}` | {v.created_at} | {v.source_run or ''} | {loss} | {mark} |"
        )
    return "\n".join(rows)


class WeightsConfig(dg.Config):
    """Run configuration of ``model_weights/<model>``.

    ``rollback_to``: instead of registering the newest training run's weights, make this
    registered version current (a digest, or a unique prefix of at least 8 characters).
    """

    rollback_to: str | None = None


def _safe(name: str) -> str:
    """``name`` as a Dagster job or op name."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _rollback(
    context: dg.AssetExecutionContext, store: WeightsStore, name: str, digest: str
) -> dg.MaterializeResult:
    """Make version ``digest`` of ``name`` current, recorded as a materialisation."""
    before = store.current(name)
    version = store.rollback(name, digest)
    context.log.info(
        f"{name}: rolled back from {before.digest[:12] if before else 'none'} "
        f"to {version.digest[:12]}"
    )
    versions = store.versions(name)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version.digest),
        metadata={
            **_version_metadata(
                version,
                source_run=version.source_run or "",
                metrics=version.metrics,
                new=False,
                promoted=True,
                current=version,
                versions=versions,
            ),
            "rolled_back_from": before.digest if before else "",
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=CHECK_NAME,
                passed=True,
                description="a rollback picks a registered version by hand: no gate applies",
            )
        ],
    )


def _external_defs(name: str, model: Model) -> dg.Definitions:
    key = model_weights_key(name)

    def _observe(context: dg.OpExecutionContext) -> dg.ObserveResult:
        store: WeightsStore = context.resources.weights_store
        current = store.current(name)
        if current is not None:
            return dg.ObserveResult(
                data_version=dg.DataVersion(current.digest),
                metadata={"digest": current.digest, "weights_uri": current.uri},
            )
        identity = f"external:{model.base_model}"
        return dg.ObserveResult(
            data_version=dg.DataVersion(hashlib.sha256(identity.encode()).hexdigest()),
            metadata={
                "base_model": model.base_model or "",
                "hub_url": dg.MetadataValue.url(f"https://huggingface.co/{model.base_model}"),
                "stored": False,
            },
        )

    # observable_source_asset is beta; that is known here and not worth a warning per load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        observable = dg.observable_source_asset(
            key=key,
            group_name="ml",
            description=f"Weights of {name}: {model.base_model}, not trained here.",
            required_resource_keys={"weights_store"},
            metadata={"source": "external", "base_model": model.base_model or ""},
        )(_observe)
    return dg.Definitions(assets=[observable])


def build_model_weights_defs(
    name: str, model: Model, runs: dict[str, TrainingRun]
) -> dg.Definitions:
    """The asset of model ``name``'s weights, fed by the training runs ``runs``."""
    if model.source == "external":
        return _external_defs(name, model)
    key = model_weights_key(name)
    run_keys = {run: training_run_key(run) for run in runs}

    @dg.asset(
        key=key,
        deps=list(run_keys.values()),
        group_name="ml",
        kinds={"safetensors"},
        description=f"Versions of {name}'s weights, trained by {', '.join(runs) or 'no run'}.",
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_NAME,
                asset=key,
                blocking=True,
                description="The new version's held-out loss is no worse than the current "
                "version's by more than the run's max_eval_loss_regression (relative).",
            )
        ],
    )
    def _weights(
        context: dg.AssetExecutionContext, config: WeightsConfig, weights_store: WeightsStore
    ) -> dg.MaterializeResult:
        if config.rollback_to:
            try:
                return _rollback(context, weights_store, name, config.rollback_to)
            except WeightsError as exc:
                raise dg.Failure(description=f"{key.to_user_string()}: {exc}") from exc
        events = {
            run: context.instance.get_latest_materialization_event(run_key)
            for run, run_key in run_keys.items()
        }
        latest = [(event.timestamp, run, event) for run, event in events.items() if event]
        if not latest:
            raise dg.Failure(
                description=f"{key.to_user_string()}: no training run of {name} has been "
                f"materialised yet ({', '.join(k.to_user_string() for k in run_keys.values())})",
                allow_retries=False,
            )
        _, run, event = max(latest, key=lambda item: item[0])
        metrics = {
            m: float(v)  # type: ignore[arg-type]
            for m in ("train_loss_final", "eval_loss", "perplexity")
            if (v := _value(event, m)) is not None
        }
        try:
            version, new = weights_store.register(
                name,
                str(_value(event, "weights_uri")),
                expected_digest=str(_value(event, "weights_digest")),
                source_run=run,
                execution_id=str(_value(event, "execution_id") or "") or None,
                execution_url=str(_value(event, "execution_url") or "") or None,
                fingerprint=str(_value(event, "fingerprint") or "") or None,
                corpus_digest=str(_value(event, "corpus_digest") or "") or None,
                parameter_count=_value(event, "parameter_count"),
                metrics=metrics,
            )
            current = weights_store.current(name)
            passed, reason, check_metadata = regression_verdict(
                version, current, runs[run].max_eval_loss_regression
            )
            # A version registered before and not current was rejected or rolled back from:
            # only a rollback makes it current again, not a re-materialisation.
            promoted = passed and (current is None or (new and current.digest != version.digest))
            if promoted:
                weights_store.set_current(name, version.digest, f"trained by {run}")
                current = version
            elif passed and current is not None and current.digest != version.digest:
                reason += (
                    "; registered before and not current: materialise with config "
                    f"rollback_to: {version.digest[:12]} to make it current"
                )
            versions = weights_store.versions(name)
        except WeightsError as exc:
            raise dg.Failure(
                description=f"{key.to_user_string()}: {exc}", allow_retries=False
            ) from exc
        verb = "registered new" if new else "found registered"
        context.log.info(
            f"{verb} version {version.digest[:12]} of {name}; "
            + (
                "now current"
                if promoted
                else f"current stays {current.digest[:12] if current else 'none'}"
            )
            + f" ({reason})"
        )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version.digest),
            metadata=_version_metadata(
                version,
                source_run=run,
                metrics=metrics,
                new=new,
                promoted=promoted,
                current=current,
                versions=versions,
            ),
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_NAME,
                    passed=passed,
                    description=reason,
                    metadata=check_metadata,
                )
            ],
        )

    return dg.Definitions(assets=[_weights])
